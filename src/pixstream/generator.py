"""Realistic Pix messages, as rows ready for COPY.

Faker is far too slow to call per message at 25,000 messages/s, so each
process draws pools of Faker ``pt_BR`` names and phrases once and samples from
them; identifiers, documents and amounts are built per message.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from functools import cache

from faker import Faker
from psycopg_pool import ConnectionPool

from pixstream import db, store

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


def _check_digit(digits: list[int], weights: range | tuple[int, ...]) -> int:
    remainder = sum(d * w for d, w in zip(digits, weights, strict=True)) % 11
    return 0 if remainder < 2 else 11 - remainder


def cpf(rng: random.Random) -> str:
    """An 11-digit CPF with valid check digits (never all one digit)."""
    while True:
        digits = [rng.randrange(10) for _ in range(9)]
        if len(set(digits)) > 1:
            break
    digits.append(_check_digit(digits, _CPF_WEIGHTS_1))
    digits.append(_check_digit(digits, _CPF_WEIGHTS_2))
    return "".join(map(str, digits))


def cnpj(rng: random.Random) -> str:
    """A 14-digit CNPJ (head office, branch 0001) with valid check digits."""
    digits = [rng.randrange(10) for _ in range(8)] + [0, 0, 0, 1]
    digits.append(_check_digit(digits, _CNPJ_WEIGHTS_1))
    digits.append(_check_digit(digits, _CNPJ_WEIGHTS_2))
    return "".join(map(str, digits))


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


@cache
def _pools() -> tuple[list[str], list[str], list[str]]:
    fake = Faker("pt_BR")
    people = [fake.name() for _ in range(4000)]
    companies = [fake.company() for _ in range(800)]
    notes = [fake.sentence(nb_words=4).rstrip(".") for _ in range(300)] + [
        "Aluguel", "Pizza de sexta", "Divisão do almoço", "Presente", "Mensalidade",
        "Conta de luz", "Uber", "Feira", "Reembolso", "Dízimo",
    ]  # fmt: skip
    return people, companies, notes


def amount(rng: random.Random) -> Decimal:
    """A payment in reais: mostly small, a long tail of large ones (log-normal)."""
    cents = int(rng.lognormvariate(8.3, 1.3))  # median about R$ 40
    return Decimal(max(1, min(cents, 5_000_000_00))).scaleb(-2)


class MessageFactory:
    """Make message rows addressed to one recipient ISPB."""

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)
        self._people, self._companies, self._notes = _pools()

    def _party(self, ispb: str) -> tuple[str, str, str, str, str, str]:
        rng = self._rng
        if rng.random() < 0.15:
            name, document = rng.choice(self._companies), cnpj(rng)
        else:
            name, document = rng.choice(self._people), cpf(rng)
        return (
            name,
            document,
            ispb,
            f"{rng.randrange(1, 10000):04d}",
            str(rng.randrange(10_000, 99_999_999)),
            rng.choices(ACCOUNT_TYPES, _ACCOUNT_TYPE_WEIGHTS)[0],
        )

    def row(self, recipient_ispb: str, now: datetime | None = None) -> tuple[object, ...]:
        """One message as a COPY row in COLUMNS order."""
        rng = self._rng
        now = now or datetime.now(UTC)
        payer_ispb = rng.choice(PARTICIPANTS)[0]
        end_to_end_id = f"E{payer_ispb}{now:%Y%m%d%H%M}{''.join(rng.choices(_ALNUM, k=11))}"
        campo_livre = rng.choice(self._notes) if rng.random() < 0.2 else ""
        tx_id = "".join(rng.choices(_ALNUM, k=rng.randrange(26, 36)))
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


def insert_random(
    pool: ConnectionPool,
    ispb: str,
    count: int,
    *,
    batch_size: int = 10_000,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """COPY ``count`` random messages for ``ispb``, one transaction per batch."""
    factory = MessageFactory()
    inserted = 0
    while inserted < count:
        size = min(batch_size, count - inserted)
        with db.transaction(pool) as conn:
            written = store.copy_messages(conn, factory.rows(ispb, size))
        inserted += written
        if on_batch is not None:
            on_batch(written)
    return inserted
