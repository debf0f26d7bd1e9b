"""The wire form: every ArrayRecord packed into one Array, bit for bit, and nothing a client
can send makes the unpacking read past its bytes or build anything but plain numbers."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from plateau import messages as wire
from tests.helpers import FakeGrid


def model_record() -> ArrayRecord:
    """A record with every kind of tensor a model or a reply carries: float32 tails included."""
    generator = torch.Generator().manual_seed(0)
    return ArrayRecord({
        "layer.weight": torch.randn(7, 5, generator=generator),
        "layer.bias": torch.randn(5, generator=generator).double(),
        "bn.num_batches_tracked": torch.tensor(12345678901, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
        "bytes": torch.arange(256, dtype=torch.uint8),
    })


def objects(record: ArrayRecord) -> int:
    """The objects Flower moves for a record: itself, each Array, each Array's chunks."""
    return 1 + sum(1 + len(array.children) for array in record.children.values())


def test_a_packed_record_is_one_object_and_unpacks_bit_for_bit() -> None:
    record = model_record()
    packed = wire.pack_record(record)
    assert objects(record) == 13 and objects(packed) == 3
    unpacked = wire.unpack_record(packed)
    assert list(unpacked.keys()) == list(record.keys())
    for name, array in record.items():
        again = unpacked[name]
        assert (again.dtype, again.shape) == (array.dtype, array.shape)
        assert again.numpy().tobytes() == array.numpy().tobytes()


def test_a_large_record_is_chunked_by_flower_not_split_by_tensor() -> None:
    record = ArrayRecord({f"w{i}": torch.ones(1000, 500) for i in range(4)})  # 8 MB
    assert objects(wire.pack_record(record)) == 1 + 1 + 2  # record, Array, two 5 MB chunks


def test_flowers_own_form_is_read_as_it_is() -> None:
    record = model_record()
    assert wire.unpack_record(record) is record


def packed_with(layout: object, payload: bytes, header: bytes | None = None) -> ArrayRecord:
    """A packed record written by hand: any header, any payload."""
    header = json.dumps(layout).encode() if header is None else header
    data = struct.pack("<Q", len(header)) + header + payload
    return ArrayRecord({wire.PACKED_KEY: Array(dtype="uint8", shape=(len(data),),
                                               stype=wire.PACKED_STYPE, data=data)})


@pytest.mark.parametrize(("record", "complaint"), [
    (packed_with([["w", "<f4", [2]]], b"\0" * 4), "ends inside array 'w'"),
    (packed_with([["w", "<f4", [2]]], b"\0" * 12), "4 bytes past its arrays"),
    (packed_with([["w", "<f4", [2**40, 2**40]]], b"\0" * 8), "ends inside array 'w'"),
    (packed_with([["w", "<f4", [-1]]], b""), "header entry is malformed"),
    (packed_with([["w", "<f4", [2.0]]], b"\0" * 8), "header entry is malformed"),
    (packed_with([["w", "|O", [1]]], b"\0" * 8), "not a plain number type"),
    (packed_with([["w", "<U2", [1]]], b"\0" * 8), "not a plain number type"),
    (packed_with([["w", "<c8", [1]]], b"\0" * 8), "not a plain number type"),
    (packed_with([["w", [["a", "<f4"]], [1]]], b"\0" * 4), "header entry is malformed"),
    (packed_with([["w", "V4", [1]]], b"\0" * 4), "not a plain number type"),
    (packed_with([["w", "not-a-dtype", [1]]], b"\0" * 4), "not a plain number type"),
    (packed_with([["w", ",1", [1]]], b"\0" * 4), "not a plain number type"),  # numpy: ast
    (packed_with([["w", "f4,(", [1]]], b"\0" * 4), "not a plain number type"),
    (packed_with(None, b"", header=b"[" * 100_000), "not JSON"),  # RecursionError in json
    (packed_with(None, b"", header=b'[["w","<f4",[' + b"9" * 5000 + b"]]]"), "not JSON"),
    (packed_with([["w", "<f4", [1]], ["w", "<f4", [1]]], b"\0" * 8), "names 'w' twice"),
    (packed_with({"w": 1}, b""), "not a list"),
    (packed_with(None, b"", header=b"{not json"), "not JSON"),
    (ArrayRecord({wire.PACKED_KEY: Array(dtype="uint8", shape=(3,), stype=wire.PACKED_STYPE,
                                         data=b"abc")}), "shorter than its header length"),
    (ArrayRecord({wire.PACKED_KEY: Array(dtype="uint8", shape=(8,), stype=wire.PACKED_STYPE,
                                         data=struct.pack("<Q", 2**63))}), "runs past its end"),
])
def test_a_malformed_packed_record_is_refused_with_its_reason(record: ArrayRecord,
                                                              complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        wire.unpack_record(record)


def test_a_record_of_objects_is_not_packed() -> None:
    with pytest.raises(ValueError, match="cannot pack array 'names'"):
        wire.pack_record(ArrayRecord({"names": Array(np.array(["a", "b"]))}))


def train_messages(record: ArrayRecord, nodes: list[int]) -> list[Message]:
    return [Message(RecordDict({wire.MODEL_KEY: record, wire.CONFIG_KEY: ConfigRecord({})}),
                    dst_node_id=node, message_type=MessageType.TRAIN) for node in nodes]


class EchoGrid(FakeGrid):
    """Answers each train message with its own model as the update, in the form it came."""

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        messages = list(messages)
        self.sent.extend(messages)
        return [Message(RecordDict({wire.UPDATE_KEY: m.content[wire.MODEL_KEY]}), reply_to=m)
                for m in messages]


def test_the_server_sends_packed_once_for_the_cohort_and_reads_replies_unpacked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(wire.PACK_ENV, raising=False)
    record, grid = model_record(), EchoGrid([1, 2, 3])
    replies = wire.exchange(grid, train_messages(record, [1, 2, 3]), timeout=5,
                            poll_interval=0.01)
    sent = [m.content[wire.MODEL_KEY] for m in grid.sent]
    assert all(wire.is_packed(r) for r in sent) and len({id(r) for r in sent}) == 1
    assert len(replies) == 3
    for answer in replies:
        update = answer.content[wire.UPDATE_KEY]
        assert not wire.is_packed(update)
        assert all(update[k].numpy().tobytes() == v.numpy().tobytes() for k, v in record.items())


def test_packing_off_sends_flowers_own_form(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(wire.PACK_ENV, "0")
    record, grid = model_record(), EchoGrid([1])
    wire.exchange(grid, train_messages(record, [1]), timeout=5, poll_interval=0.01)
    assert grid.sent[0].content[wire.MODEL_KEY] is record


def test_a_client_reads_and_answers_in_the_wire_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ClientApp's entry points take packed content and give packed content back; what
    runs in between sees Flower's usual records."""
    monkeypatch.delenv(wire.PACK_ENV, raising=False)
    content = RecordDict({wire.MODEL_KEY: model_record(), wire.CONFIG_KEY: ConfigRecord({})})
    packed = wire.pack_content(content)
    assert wire.is_packed(packed[wire.MODEL_KEY])
    assert packed[wire.CONFIG_KEY] is content[wire.CONFIG_KEY]
    unpacked = wire.unpack_content(packed)
    assert list(unpacked[wire.MODEL_KEY].keys()) == list(model_record().keys())


@pytest.mark.parametrize("header", [b'[["w",",1",[1]]]', b"[" * 100_000])
def test_a_reply_whose_unpacking_raises_anything_is_screened_not_fatal(header: bytes) -> None:
    """numpy's dtype parser raises SyntaxError, json a RecursionError: neither may stop the
    server's exchange; the screening rejects the reply as malformed."""
    from strategies.screening import RejectedReply, decode

    hostile = packed_with(None, b"\0" * 4, header=header)

    class HostileGrid(FakeGrid):
        def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
            return [Message(RecordDict({wire.UPDATE_KEY: hostile}), reply_to=m)
                    for m in messages]

    replies = wire.exchange(HostileGrid([1]), train_messages(model_record(), [1]), timeout=5,
                            poll_interval=0.01)
    update = replies[0].content[wire.UPDATE_KEY]
    with pytest.raises(RejectedReply, match="malformed"):
        decode(update, {"w": torch.zeros(1)}, torch.device("cpu"))
