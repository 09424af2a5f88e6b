"""Realistic Pix messages, as rows ready for COPY; storing them is pixstream.seeding's job.

Faker is far too slow to call per message at 25,000 messages/s, so each
process draws pools of Faker ``pt_BR`` names and phrases once and samples from
them; identifiers, documents and amounts are built per message.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from functools import cache

from faker import Faker

# Real Pix participants (ISPB, name): payers are drawn from these.
PARTICIPANTS: tuple[tuple[str, str], ...] = (
    ("00000000", "Banco do Brasil"),
    ("00360305", "Caixa Econômica Federal"),
    ("60701190", "Itaú Unibanco"),
    ("60746948", "Bradesco"),
    ("90400888", "Santander"),
    ("18236120", "Nu Pagamentos (Nubank)"),
    ("00416968", "Banco Inter"),
    ("31872495", "Banco C6"),
    ("22896431", "PicPay"),
    ("10573521", "Mercado Pago"),
    ("30306294", "BTG Pactual"),
    ("92702067", "Banrisul"),
    ("08561701", "PagSeguro (PagBank)"),
    ("07237373", "Banco do Nordeste"),
    ("04902979", "Banco da Amazônia"),
    ("00000208", "BRB - Banco de Brasília"),
    ("58160789", "Banco Safra"),
    ("59588111", "Banco Votorantim (BV)"),
    ("01181521", "Banco Cooperativo Sicredi"),
    ("02038232", "Bancoob (Sicoob)"),
    ("62232889", "Banco Daycoval"),
    ("17184037", "Banco Mercantil do Brasil"),
)

ACCOUNT_TYPES = ("CACC", "SVGS", "SLRY", "TRAN")
_ACCOUNT_TYPE_WEIGHTS = (70, 15, 10, 5)

# The column order of the rows, as the COPY in sql/queries.sql expects them.
COLUMNS = (
    "end_to_end_id", "valor",
    "payer_name", "payer_cpf_cnpj", "payer_ispb", "payer_agencia", "payer_conta",
    "payer_tipo_conta",
    "recipient_name", "recipient_cpf_cnpj", "recipient_ispb", "recipient_agencia",
    "recipient_conta", "recipient_tipo_conta",
    "campo_livre", "tx_id", "paid_at",
)  # fmt: skip

_ALNUM = string.ascii_letters + string.digits
_CPF_WEIGHTS_1 = range(10, 1, -1)
_CPF_WEIGHTS_2 = range(11, 1, -1)
_CNPJ_WEIGHTS_1 = (5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2)
_CNPJ_WEIGHTS_2 = (6, 5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2)

# Digital banks open every account in agency 0001.
_SINGLE_AGENCY = frozenset({"18236120", "00416968", "31872495", "22896431", "10573521", "08561701"})

# Random bytes map to alphanumerics through this table; the 8 bytes values past
# 4 * 62 are dropped rather than folded in, so every symbol is equally likely.
_ALNUM_TABLE = bytes(ord(_ALNUM[i % len(_ALNUM)]) for i in range(256))
_ALNUM_DROP = bytes(range(4 * len(_ALNUM), 256))


def _check_digit(digits: list[int], weights: range | tuple[int, ...]) -> int:
    remainder = sum(d * w for d, w in zip(digits, weights, strict=True)) % 11
    return 0 if remainder < 2 else 11 - remainder


def _mod11(total: int) -> int:
    remainder = total % 11
    return 0 if remainder < 2 else 11 - remainder


def _chunk_table(width: int, weights: tuple[int, ...] | range) -> list[int]:
    """For every ``width``-digit chunk, the sum of its digits times ``weights``."""
    weights = tuple(weights)
    return [
        sum(int(d) * w for d, w in zip(f"{n:0{width}d}", weights, strict=True))
        for n in range(10**width)
    ]


@cache
def _tables() -> dict[str, list[int]]:
    """Weighted digit sums per chunk: a check digit costs a few lookups, not a loop."""
    cpf1 = tuple(_CPF_WEIGHTS_1)
    return {
        "cpf0": _chunk_table(3, cpf1[0:3]),
        "cpf1": _chunk_table(3, cpf1[3:6]),
        "cpf2": _chunk_table(3, cpf1[6:9]),
        "digitsum3": _chunk_table(3, (1, 1, 1)),
        "cnpj1a": _chunk_table(4, _CNPJ_WEIGHTS_1[0:4]),
        "cnpj1b": _chunk_table(4, _CNPJ_WEIGHTS_1[4:8]),
        "cnpj2a": _chunk_table(4, _CNPJ_WEIGHTS_2[0:4]),
        "cnpj2b": _chunk_table(4, _CNPJ_WEIGHTS_2[4:8]),
    }


def _cpf_from_base(base: int) -> str:
    """The CPF whose first nine digits are ``base`` (0 <= base < 10**9)."""
    t = _tables()
    hi, mid, lo = base // 1_000_000, base // 1000 % 1000, base % 1000
    first = _mod11(t["cpf0"][hi] + t["cpf1"][mid] + t["cpf2"][lo])
    # Weights 11..3 are weights 10..2 plus one: add the digit sum.
    total = t["cpf0"][hi] + t["cpf1"][mid] + t["cpf2"][lo]
    second = _mod11(
        total + t["digitsum3"][hi] + t["digitsum3"][mid] + t["digitsum3"][lo] + 2 * first
    )
    return f"{base:09d}{first}{second}"


def _cnpj_from_base(base: int) -> str:
    """The head-office CNPJ (branch 0001) whose first eight digits are ``base``."""
    t = _tables()
    hi, lo = base // 10_000, base % 10_000
    # The branch digits 0001 weigh 2 in the first sum and 3 in the second.
    first = _mod11(t["cnpj1a"][hi] + t["cnpj1b"][lo] + 2)
    second = _mod11(t["cnpj2a"][hi] + t["cnpj2b"][lo] + 3 + 2 * first)
    return f"{base:08d}0001{first}{second}"


def cpf(rng: random.Random) -> str:
    """An 11-digit CPF with valid check digits (never all one digit)."""
    while True:
        base = rng.randrange(1_000_000_000)
        if base % 111_111_111:  # 000000000, 111111111, ... are not issued
            return _cpf_from_base(base)


def is_valid_cpf_cnpj(value: str) -> bool:
    """Check the format and check digits of a CPF (11 digits) or CNPJ (14 digits)."""
    if not value.isdigit() or len(value) not in (11, 14) or len(set(value)) == 1:
        return False
    digits = [int(c) for c in value]
    if len(value) == 11:
        weights: tuple[range | tuple[int, ...], ...] = (_CPF_WEIGHTS_1, _CPF_WEIGHTS_2)
    else:
        weights = (_CNPJ_WEIGHTS_1, _CNPJ_WEIGHTS_2)
    head = len(value) - 2
    return (
        _check_digit(digits[:head], weights[0]) == digits[head]
        and _check_digit(digits[: head + 1], weights[1]) == digits[head + 1]
    )


def alphanumerics(rng: random.Random, k: int) -> str:
    """``k`` symbols drawn uniformly from [A-Za-z0-9]."""
    text = rng.randbytes(k + 8).translate(_ALNUM_TABLE, _ALNUM_DROP)
    while len(text) < k:  # more than 8 dropped bytes: about one draw in a million
        text += rng.randbytes(k).translate(_ALNUM_TABLE, _ALNUM_DROP)
    return text[:k].decode("ascii")


_COMPANY_SUFFIXES = ("Ltda.", "S.A.", "- ME", "- EI", "e Filhos", "Comércio Ltda.")

# What people actually write in the free field of a Pix (campoLivre).
_NOTES = (
    "Aluguel", "Pizza de sexta", "Divisão do almoço", "Presente", "Mensalidade",
    "Conta de luz", "Uber", "Feira", "Reembolso", "Dízimo", "Condomínio", "Academia",
    "Churrasco", "Vaquinha", "Salário", "Diarista", "Material escolar", "Escola",
    "Conta de água", "Internet", "Mercado", "Farmácia", "Gasolina", "Passagem",
    "Festa de aniversário", "Racha da conta", "Empréstimo", "Devolução", "Frete",
    "Manicure", "Corte de cabelo", "Ingresso do show", "Cerveja", "Açaí",
    "Obrigado!", "Valeu!", "Pagamento", "Adiantamento", "Sinal", "Taxa de entrega",
)  # fmt: skip


@cache
def _pools() -> tuple[list[str], list[str], list[str]]:
    """Names and free-text notes, drawn once per process from Faker pt_BR.

    A bank registers a full civil name (no "Sr." or "Dra."): first name and one
    or two surnames. Companies carry a legal-form suffix.
    """
    fake = Faker("pt_BR")
    people = []
    for i in range(4000):
        surnames = [fake.last_name() for _ in range(1 + i % 2)]
        people.append(" ".join([fake.first_name(), *surnames]))
    companies = []
    for i in range(800):
        company = fake.company()
        company = company[0].upper() + company[1:]  # "da Paz" heads a line as "Da Paz"
        if not company.endswith(_COMPANY_SUFFIXES):
            company = f"{company} {_COMPANY_SUFFIXES[i % len(_COMPANY_SUFFIXES)]}"
        companies.append(company)
    notes = [
        *_NOTES,
        *(f"Parcela {n}/{total}" for total in (3, 6, 10, 12) for n in range(1, total + 1)),
        *(f"Pedido {fake.random_number(digits=6, fix_len=True)}" for _ in range(60)),
        *(f"NF {fake.random_number(digits=5, fix_len=True)}" for _ in range(30)),
        *(f"Ref. {month}" for month in ("janeiro", "fevereiro", "março", "abril", "maio",
                                        "junho", "julho", "agosto", "setembro", "outubro",
                                        "novembro", "dezembro")),
    ]  # fmt: skip
    return people, companies, notes


_MAX_CENTS = 5_000_000_00


def amount(rng: random.Random) -> Decimal:
    """A payment in reais: mostly small, a long tail of large ones (log-normal)."""
    cents = int(math.exp(rng.gauss(8.3, 1.3)))  # median about R$ 40
    return Decimal(max(1, min(cents, _MAX_CENTS))).scaleb(-2)


_AGENCIES = tuple(f"{n:04d}" for n in range(10_000))
# ACCOUNT_TYPES repeated by weight: one uniform index draws a weighted type.
_ACCOUNT_TYPE_DRAW = tuple(
    kind
    for kind, weight in zip(ACCOUNT_TYPES, _ACCOUNT_TYPE_WEIGHTS, strict=True)
    for _ in range(weight)
)


class MessageFactory:
    """Make message rows addressed to one recipient ISPB."""

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)
        self._people, self._companies, self._notes = _pools()
        _tables()

    def _party(self, ispb: str) -> tuple[str, str, str, str, str, str]:
        rng = self._rng
        draw = rng.random
        if draw() < 0.15:
            name = self._companies[int(draw() * len(self._companies))]
            document = _cnpj_from_base(int(draw() * 100_000_000))
        else:
            name = self._people[int(draw() * len(self._people))]
            document = cpf(rng)
        agency = "0001" if ispb in _SINGLE_AGENCY else _AGENCIES[1 + int(draw() * 9999)]
        return (
            name,
            document,
            ispb,
            agency,
            str(10_000 + int(draw() * 99_989_999)),
            _ACCOUNT_TYPE_DRAW[int(draw() * len(_ACCOUNT_TYPE_DRAW))],
        )

    def row(self, recipient_ispb: str, now: datetime | None = None) -> tuple[object, ...]:
        """One message as a COPY row in COLUMNS order."""
        rng = self._rng
        now = now or datetime.now(UTC)
        payer_ispb = PARTICIPANTS[int(rng.random() * len(PARTICIPANTS))][0]
        end_to_end_id = f"E{payer_ispb}{now:%Y%m%d%H%M}{alphanumerics(rng, 11)}"
        campo_livre = (
            self._notes[int(rng.random() * len(self._notes))] if rng.random() < 0.2 else ""
        )
        tx_id = alphanumerics(rng, 26 + int(rng.random() * 10))
        return (
            end_to_end_id,
            amount(rng),
            *self._party(payer_ispb),
            *self._party(recipient_ispb),
            campo_livre,
            tx_id,
            now,
        )

    def rows(self, recipient_ispb: str, count: int) -> Iterator[tuple[object, ...]]:
        now = datetime.now(UTC)
        for i in range(count):
            if i % 1000 == 999:
                now = datetime.now(UTC)
            yield self.row(recipient_ispb, now)
