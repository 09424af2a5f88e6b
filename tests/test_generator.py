"""Generated messages follow the protocol's field rules, in memory and on the wire.

The check-digit checker here is written independently of the generator's (the
"(sum * 10) mod 11 mod 10" form for CPF, right-to-left cyclic weights for CNPJ),
so a shared mistake cannot hide.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from flask.testing import FlaskClient

from pixstream import generator, store
from pixstream.generator import COLUMNS, PARTICIPANTS, MessageFactory

TARGET = "32074986"
PARTICIPANT_ISPBS = {ispb for ispb, _ in PARTICIPANTS}
E2E = re.compile(r"E([0-9]{8})([0-9]{12})[A-Za-z0-9]{11}")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
MESSAGE_KEYS = {
    "endToEndId",
    "valor",
    "pagador",
    "recebedor",
    "campoLivre",
    "txId",
    "dataHoraPagamento",
}
PARTY_KEYS = {"nome", "cpfCnpj", "ispb", "agencia", "contaTransacional", "tipoConta"}
ACCOUNT_TYPES = {"CACC", "SVGS", "SLRY", "TRAN"}


def valid_cpf(value: str) -> bool:
    if not re.fullmatch(r"[0-9]{11}", value) or len(set(value)) == 1:
        return False
    for n in (9, 10):
        total = sum(int(value[i]) * (n + 1 - i) for i in range(n))
        if (total * 10) % 11 % 10 != int(value[n]):
            return False
    return True


def valid_cnpj(value: str) -> bool:
    if not re.fullmatch(r"[0-9]{14}", value) or len(set(value)) == 1:
        return False
    for n in (12, 13):
        # Weights 2, 3, ..., 9, 2, 3, ... from the rightmost digit leftwards.
        total = sum(int(value[n - 1 - i]) * (2 + i % 8) for i in range(n))
        digit = 11 - total % 11
        if (0 if digit >= 10 else digit) != int(value[n]):
            return False
    return True


def valid_document(value: str) -> bool:
    return valid_cpf(value) if len(value) == 11 else valid_cnpj(value)


def test_independent_checker_knows_real_documents() -> None:
    """The checker itself: published valid examples pass, any altered digit fails."""
    for good in ("52998224725", "11144477735", "11222333000181", "04252011000110"):
        assert valid_document(good), good
        for i in range(len(good)):
            altered = good[:i] + str((int(good[i]) + 1) % 10) + good[i + 1 :]
            assert not valid_document(altered), altered
    assert not valid_document("11111111111")
    assert not valid_document("00000000000000")


@pytest.fixture(scope="module")
def generated() -> tuple[list[dict[str, Any]], datetime, datetime]:
    before = datetime.now(UTC)
    rows = [dict(zip(COLUMNS, row, strict=True)) for row in MessageFactory().rows(TARGET, 100_000)]
    after = datetime.now(UTC)
    return rows, before, after


def test_row_shape(generated: tuple[list[dict[str, Any]], datetime, datetime]) -> None:
    rows, _, _ = generated
    assert len(rows) == 100_000
    assert len(COLUMNS) == 17
    assert all(len(row) == len(COLUMNS) for row in rows)


def test_end_to_end_ids(generated: tuple[list[dict[str, Any]], datetime, datetime]) -> None:
    rows, before, after = generated
    ids = [row["end_to_end_id"] for row in rows]
    assert len(set(ids)) == len(ids), "endToEndId must be unique"
    earliest = before.replace(second=0, microsecond=0, tzinfo=None)
    for row, e2e in zip(rows, ids, strict=True):
        match = E2E.fullmatch(e2e)
        assert match and len(e2e) == 32, e2e
        assert match.group(1) == row["payer_ispb"], e2e
        assert match.group(1) in PARTICIPANT_ISPBS, e2e
        stamp = datetime.strptime(match.group(2), "%Y%m%d%H%M")
        assert earliest <= stamp <= after.replace(tzinfo=None), e2e
        # The id's minute is the payment's minute.
        assert match.group(2) == f"{row['paid_at']:%Y%m%d%H%M}", e2e
    # Payers come from many institutions, not one.
    assert len({row["payer_ispb"] for row in rows}) >= len(PARTICIPANTS) // 2


def test_documents_have_valid_check_digits(
    generated: tuple[list[dict[str, Any]], datetime, datetime],
) -> None:
    rows, _, _ = generated
    kinds: Counter[int] = Counter()
    for row in rows:
        for column in ("payer_cpf_cnpj", "recipient_cpf_cnpj"):
            value = row[column]
            assert len(value) in (11, 14), value
            assert valid_document(value), f"{column} {value} has wrong check digits"
            kinds[len(value)] += 1
    # Mostly people (CPF), some companies (CNPJ).
    assert kinds[11] > kinds[14] > 0.05 * (kinds[11] + kinds[14])


def test_parties(generated: tuple[list[dict[str, Any]], datetime, datetime]) -> None:
    rows, _, _ = generated
    types: Counter[str] = Counter()
    for row in rows:
        assert row["recipient_ispb"] == TARGET
        assert row["payer_ispb"] in PARTICIPANT_ISPBS
        for side in ("payer", "recipient"):
            name = row[f"{side}_name"]
            assert isinstance(name, str) and name.strip() == name and name, row
            assert not re.search(r"[\t\n\r\\]", name), name
            assert re.fullmatch(r"[0-9]{4}", row[f"{side}_agencia"]), row
            assert re.fullmatch(r"[0-9]{1,20}", row[f"{side}_conta"]), row
            assert row[f"{side}_tipo_conta"] in ACCOUNT_TYPES, row
            types[row[f"{side}_tipo_conta"]] += 1
    assert set(types) == ACCOUNT_TYPES
    assert types.most_common(1)[0][0] == "CACC"
    assert len({row["payer_name"] for row in rows}) > 1000


def test_amounts(generated: tuple[list[dict[str, Any]], datetime, datetime]) -> None:
    rows, _, _ = generated
    amounts = [row["valor"] for row in rows]
    for value in amounts:
        assert isinstance(value, Decimal), value
        assert value.as_tuple().exponent == -2, value
        assert Decimal("0.01") <= value <= Decimal("5000000.00"), value
    median = statistics.median(amounts)
    assert Decimal(5) <= median <= Decimal(500), median
    # Log-normal around R$ 40: about 0.7% reach R$ 1,000, about 0.1% R$ 2,000.
    large = sum(1 for value in amounts if value >= 1000)
    assert 0.003 * len(amounts) <= large <= 0.2 * len(amounts), large
    assert max(amounts) >= 2000
    assert len(set(amounts)) > 10_000


def test_free_text_and_tx_id(generated: tuple[list[dict[str, Any]], datetime, datetime]) -> None:
    rows, before, after = generated
    empty = sum(1 for row in rows if row["campo_livre"] == "")
    assert 0.5 * len(rows) < empty < len(rows), "campoLivre: mostly empty, sometimes a note"
    for row in rows:
        assert not re.search(r"[\t\n\r\\]", row["campo_livre"])
        assert re.fullmatch(r"[A-Za-z0-9]{1,35}", row["tx_id"]), row["tx_id"]
        paid_at = row["paid_at"]
        assert paid_at.utcoffset() == timedelta(0)
        assert before - timedelta(seconds=1) <= paid_at <= after


def test_seed_makes_it_reproducible() -> None:
    now = datetime(2024, 2, 21, 19, 27, tzinfo=UTC)

    def draw(seed: int) -> list[tuple[object, ...]]:
        factory = MessageFactory(seed=seed)
        return [factory.row(TARGET, now) for _ in range(50)]

    first, again, other = draw(42), draw(42), draw(43)
    assert first == again
    assert first != other


# --- On the wire: the JSON the database produces for generated messages -------


def fetch_batch(client: FlaskClient) -> tuple[bytes, list[dict[str, Any]]]:
    reply = client.get(f"/api/pix/{TARGET}/stream/start", headers={"Accept": "multipart/json"})
    assert reply.status_code == 200, reply.data
    assert reply.content_type == "application/json"
    return reply.data, json.loads(reply.data, parse_float=Decimal)


def check_message(message: dict[str, Any]) -> None:
    assert set(message) == MESSAGE_KEYS
    assert set(message["pagador"]) == PARTY_KEYS
    assert set(message["recebedor"]) == PARTY_KEYS
    assert E2E.fullmatch(message["endToEndId"])
    assert message["endToEndId"][1:9] == message["pagador"]["ispb"]
    assert message["recebedor"]["ispb"] == TARGET
    assert isinstance(message["valor"], Decimal)
    assert message["valor"].as_tuple().exponent == -2
    assert TIMESTAMP.fullmatch(message["dataHoraPagamento"]), message["dataHoraPagamento"]
    for party in (message["pagador"], message["recebedor"]):
        assert all(isinstance(value, str) for value in party.values())
        assert valid_document(party["cpfCnpj"])
        assert re.fullmatch(r"[0-9]{4}", party["agencia"])
        assert party["tipoConta"] in ACCOUNT_TYPES
        assert party["nome"]


def test_util_route_messages_on_the_wire(client: FlaskClient) -> None:
    assert client.post(f"/api/util/msgs/{TARGET}/5").status_code == 201
    raw, messages = fetch_batch(client)
    assert len(messages) == 5
    for message in messages:
        check_message(message)
    # Every valor is a bare JSON number with exactly two decimals.
    assert len(re.findall(rb'"valor"\s*:\s*[0-9]+\.[0-9]{2}\s*[,}]', raw)) == 5
    assert b'"valor":"' not in raw.replace(b" ", b"")


def test_exact_fields_and_two_decimals(client: FlaskClient, db: psycopg.Connection) -> None:
    paid_at = datetime(2022, 7, 23, 19, 47, 18, 108_999, tzinfo=UTC)
    factory = MessageFactory(seed=1)
    valores = [Decimal("90.20"), Decimal("1500.00"), Decimal("0.05"), Decimal("1234567.89")]
    rows = []
    for valor in valores:
        row = list(factory.row(TARGET, paid_at))
        row[COLUMNS.index("valor")] = valor
        rows.append(tuple(row))
    with db.transaction():
        store.copy_messages(db, rows)

    raw, messages = fetch_batch(client)
    assert len(messages) == len(rows)
    compact = re.sub(rb"\s", b"", raw)
    for text in (b"90.20", b"1500.00", b"0.05", b"1234567.89"):
        assert b'"valor":' + text + b"," in compact, f"{text!r} not on the wire as written"
    for row, message in zip(rows, messages, strict=True):  # oldest first
        check_message(message)
        fields = dict(zip(COLUMNS, row, strict=True))
        assert message == {
            "endToEndId": fields["end_to_end_id"],
            "valor": fields["valor"],
            "pagador": {
                "nome": fields["payer_name"],
                "cpfCnpj": fields["payer_cpf_cnpj"],
                "ispb": fields["payer_ispb"],
                "agencia": fields["payer_agencia"],
                "contaTransacional": fields["payer_conta"],
                "tipoConta": fields["payer_tipo_conta"],
            },
            "recebedor": {
                "nome": fields["recipient_name"],
                "cpfCnpj": fields["recipient_cpf_cnpj"],
                "ispb": fields["recipient_ispb"],
                "agencia": fields["recipient_agencia"],
                "contaTransacional": fields["recipient_conta"],
                "tipoConta": fields["recipient_tipo_conta"],
            },
            "campoLivre": fields["campo_livre"],
            "txId": fields["tx_id"],
            # Milliseconds, UTC, Z: the microseconds are cut, not rounded up.
            "dataHoraPagamento": "2022-07-23T19:47:18.108Z",
        }


def test_single_message_has_exact_fields(client: FlaskClient) -> None:
    assert client.post(f"/api/util/msgs/{TARGET}/1").status_code == 201
    reply = client.get(f"/api/pix/{TARGET}/stream/start")
    assert reply.status_code == 200
    assert reply.content_type == "application/json"
    message = json.loads(reply.data, parse_float=Decimal)
    assert isinstance(message, dict)
    check_message(message)
    assert re.search(rb'"valor"\s*:\s*[0-9]+\.[0-9]{2}\s*[,}]', reply.data)


def test_generated_documents_pass_the_generators_own_check() -> None:
    """generator.is_valid_cpf_cnpj agrees with the independent checker."""
    factory = MessageFactory(seed=5)
    for row in factory.rows(TARGET, 2000):
        fields = dict(zip(COLUMNS, row, strict=True))
        for value in (fields["payer_cpf_cnpj"], fields["recipient_cpf_cnpj"]):
            assert generator.is_valid_cpf_cnpj(value) == valid_document(value) is True
    for bad in ("52998224724", "11222333000180", "1234567890", "abcdefghijk"):
        assert generator.is_valid_cpf_cnpj(bad) is False
        assert valid_document(bad) is False
