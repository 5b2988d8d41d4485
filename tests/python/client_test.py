#!/usr/bin/env python3
"""baton from Python: a client written the way another team would write one, with nothing of baton
but its protos.

Generates stubs from proto/ (baton/v1 and the vendored google/rpc) with grpcio-tools into a
temporary directory, starts a real `baton dev` on free ports and a temporary data directory, and
drives it with plain grpcio: exact 64-bit integers and decimals through Upsert, Get and Query; a
batch with bad records and its chunk results; an export read to the end; and the
google.rpc.ErrorInfo and BadRequest of errors, decoded from the `grpc-status-details-bin` trailer.

    python3 tests/python/client_test.py [-v]

The binary is $BATON_BIN, or else the debug build ($CARGO_TARGET_DIR or target/, under the
repository root). Needs grpcio-tools (scripts/setup.sh installs it); scripts/test.sh runs it.
"""

import collections
import ctypes
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path

import grpc
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
# Every call's deadline, and the longest any wait for the server may take.
CALL_TIMEOUT = 30
WAIT_TIMEOUT = 120
BIG = 9007199254740993  # 2^53 + 1: the smallest integer a double cannot hold


def generate_stubs(out):
    """Generates the Python stubs of baton's public API and of google.rpc into `out`."""
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto/baton/v1").glob("*.proto"))
    protos += ["google/rpc/status.proto", "google/rpc/error_details.proto"]
    args = ["grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}", f"--grpc_python_out={out}"]
    # python -m grpc_tools.protoc adds the well-known types' include path itself; protoc.main does not
    wkt = Path(protoc.__file__).parent / "_proto"
    if protoc.main(args + [f"-I{wkt}"] + protos) != 0:
        raise RuntimeError("grpc_tools.protoc failed")
    # a regular package, so that this google.rpc is the one imported even where another package
    # (googleapis-common-protos) installs its own
    (Path(out) / "google/rpc/__init__.py").touch()
    sys.path.insert(0, str(out))


STUBS = tempfile.TemporaryDirectory(prefix="baton_py_stubs_")
generate_stubs(STUBS.name)

from baton.v1 import admin_pb2, admin_pb2_grpc  # noqa: E402
from baton.v1 import common_pb2  # noqa: E402
from baton.v1 import intake_pb2, intake_pb2_grpc  # noqa: E402
from baton.v1 import scheduler_pb2, scheduler_pb2_grpc  # noqa: E402
from google.rpc import error_details_pb2, status_pb2  # noqa: E402


def baton_bin():
    if os.environ.get("BATON_BIN"):
        return Path(os.environ["BATON_BIN"])
    return ROOT / os.environ.get("CARGO_TARGET_DIR", "target") / "debug/baton"


def die_with_parent():
    """Run in the child: SIGKILL it if this test process dies without stopping it (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class DevServer:
    """A `baton dev` process on free ports and its own data directory."""

    def __init__(self):
        self.dir = tempfile.TemporaryDirectory(prefix="baton_py_dev_")
        data = Path(self.dir.name)
        self.stdout_path, self.log_path = data / "stdout", data / "server.log"
        binary = baton_bin()
        if not binary.exists():
            raise RuntimeError(f"{binary} is missing: build it (cargo build -p baton) or set BATON_BIN")
        with open(self.stdout_path, "wb") as out, open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [str(binary), "dev", "--data-dir", str(data / "data"),
                 "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=log, preexec_fn=die_with_parent,
            )
        try:
            self.endpoint, banner_token = self._banner()
            # the token the quickstart reads: kept in the data directory on first start
            self.admin_token = (data / "data/admin-token").read_text().strip()
            assert self.admin_token == banner_token, (self.admin_token, banner_token)
            self.channel = grpc.insecure_channel(self.endpoint)
            grpc.channel_ready_future(self.channel).result(timeout=WAIT_TIMEOUT)
        except BaseException:
            self.stop()
            raise

    def _banner(self):
        """The endpoint and admin token `baton dev` prints once it listens."""
        deadline = time.monotonic() + WAIT_TIMEOUT
        while time.monotonic() < deadline:
            text = self.stdout_path.read_text()
            endpoint = re.search(r"^\s*endpoint:\s*(\S+)$", text, re.M)
            token = re.search(r"^\s*admin token:\s*(\S+)$", text, re.M)
            if endpoint and token:
                return endpoint.group(1), token.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"baton dev exited with {self.proc.returncode}:\n{self.log_tail()}")
            time.sleep(0.1)
        raise RuntimeError(f"baton dev printed no endpoint within {WAIT_TIMEOUT}s:\n{self.log_tail()}")

    def log_tail(self, lines=40):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self):
        """SIGTERM (a graceful shutdown), then SIGKILL if it is not gone within 15 s."""
        if getattr(self, "channel", None) is not None:
            self.channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.dir.cleanup()


def bearer(token):
    return [("authorization", f"Bearer {token}")]


def integer(v):
    return common_pb2.Value(integer_value=v)


def decimal(v):
    return common_pb2.Value(decimal_value=v)


def string(v):
    return common_pb2.Value(string_value=v)


def fields(**values):
    return common_pb2.RecordFields(fields=values)


def error_details(err):
    """The google.rpc.Status in an error's `grpc-status-details-bin` trailer, and its details
    unpacked: {"ErrorInfo": ErrorInfo, "BadRequest": BadRequest, ...}."""
    trailers = dict(err.trailing_metadata() or ())
    assert "grpc-status-details-bin" in trailers, f"no error details in {err}"
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    assert status.code == err.code().value[0], (status.code, err.code())
    details = {}
    for any_detail in status.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo):
            if any_detail.Is(kind.DESCRIPTOR):
                detail = kind()
                any_detail.Unpack(detail)
                details[kind.DESCRIPTOR.name] = detail
    return status, details


class ClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = DevServer()
        cls.addClassCleanup(cls.server.stop)
        channel = cls.server.channel
        cls.admin = admin_pb2_grpc.AdminStub(channel)
        cls.intake = intake_pb2_grpc.IntakeStub(channel)
        cls.scheduler = scheduler_pb2_grpc.SchedulerStub(channel)
        admin_auth = bearer(cls.server.admin_token)
        org = cls.admin.CreateOrg(admin_pb2.CreateOrgRequest(name="py"), metadata=admin_auth, timeout=CALL_TIMEOUT)
        key = cls.admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(org_id=org.id, label="python client test"),
            metadata=admin_auth, timeout=CALL_TIMEOUT,
        )
        cls.auth = bearer(key.api_key)
        F = common_pb2.FieldSpec
        T = common_pb2
        for name in ("item", "row"):
            schema = common_pb2.ObjectSchema(
                name=name, external_id_field="code",
                fields=[
                    F(name="code", type=T.FIELD_TYPE_STRING, required=True, unique=True),
                    F(name="name", type=T.FIELD_TYPE_STRING, required=True),
                    F(name="n", type=T.FIELD_TYPE_INTEGER),
                    F(name="price", type=T.FIELD_TYPE_DECIMAL),
                ],
            )
            defined = cls.admin.DefineObject(
                admin_pb2.DefineObjectRequest(org_id=org.id, schema=schema), metadata=admin_auth, timeout=CALL_TIMEOUT
            )
            assert defined.name == name

    def call(self, method, request):
        return method(request, metadata=self.auth, timeout=CALL_TIMEOUT)

    def rpc_error(self, method, request):
        with self.assertRaises(grpc.RpcError) as caught:
            self.call(method, request)
        return caught.exception

    def test_integers_and_decimals_are_exact(self):
        records = [
            fields(code=string("big"), name=string("b"), n=integer(BIG), price=decimal("-1234.50")),
            # the double nearest to BIG: a client or server that rounds cannot tell them apart
            fields(code=string("near"), name=string("b"), n=integer(BIG - 1), price=decimal("0.10")),
        ]
        upserted = self.call(self.intake.Upsert, intake_pb2.UpsertRequest(object="item", records=records))
        self.assertEqual([(r.id, r.created) for r in upserted.results], [("big", True), ("near", True)])

        got = self.call(self.intake.Get, intake_pb2.GetRequest(object="item", id="big"))
        self.assertEqual(got.fields["n"].WhichOneof("kind"), "integer_value")
        self.assertEqual(got.fields["n"].integer_value, BIG)
        self.assertEqual(got.fields["price"].WhichOneof("kind"), "decimal_value")
        self.assertEqual(got.fields["price"].decimal_value, "-1234.5")  # canonical: no trailing zero

        page = self.call(self.intake.Query, intake_pb2.QueryRequest(object="item", filter=f"n = {BIG}"))
        self.assertEqual([r.id for r in page.records], ["big"])
        self.assertEqual(page.records[0].fields["n"].integer_value, BIG)
        self.assertEqual(page.records[0].fields["price"].decimal_value, "-1234.5")
        self.assertEqual(page.next_page_token, "")
        page = self.call(self.intake.Query, intake_pb2.QueryRequest(object="item", filter=f"n = {BIG - 1}"))
        self.assertEqual([(r.id, r.fields["price"].decimal_value) for r in page.records], [("near", "0.1")])

    def test_a_batch_lists_every_bad_record(self):
        good = [fields(code=string(f"b{i:02}"), name=string("n"), n=integer(BIG + i)) for i in range(12)]
        good[3] = fields(code=string("b03"), name=string("n"), n=string("three"))  # wrong type
        good[7] = fields(code=string("b07"), n=integer(7))  # `name` is required
        good[9] = fields(code=string("b09"), name=string("n"), price=decimal("1.2.3"))  # not a decimal
        bad = {3: "n", 7: "name", 9: "price"}
        header = scheduler_pb2.BatchHeader(
            object="item", operation=scheduler_pb2.BATCH_OPERATION_UPSERT, chunk_size=5
        )
        frames = [
            scheduler_pb2.SubmitBatchRequest(header=header),
            # record indexes count across frames
            scheduler_pb2.SubmitBatchRequest(records=scheduler_pb2.BatchRecords(records=good[:6])),
            scheduler_pb2.SubmitBatchRequest(records=scheduler_pb2.BatchRecords(records=good[6:])),
        ]
        staged = self.scheduler.SubmitBatch(iter(frames), metadata=self.auth, timeout=CALL_TIMEOUT)
        self.assertEqual((staged.records, staged.chunks), (12, 3))

        # WatchBatch ends once every chunk has its outcome
        last = None
        for event in self.scheduler.WatchBatch(
            scheduler_pb2.WatchBatchRequest(batch_id=staged.batch_id), metadata=self.auth, timeout=WAIT_TIMEOUT
        ):
            last = event.batch
        self.assertIsNotNone(last)
        batch = self.call(self.scheduler.GetBatch, scheduler_pb2.GetBatchRequest(batch_id=staged.batch_id))
        self.assertEqual(batch.state, scheduler_pb2.BATCH_STATE_DONE)
        totals = batch.totals
        self.assertEqual((totals.chunks, totals.aborted, totals.committed, totals.records_committed), (3, 2, 1, 2))

        # every page, two chunks at a time
        results, token = [], ""
        while True:
            page = self.call(
                self.scheduler.ListChunkResults,
                scheduler_pb2.ListChunkResultsRequest(batch_id=staged.batch_id, page_size=2, page_token=token),
            )
            results += page.results
            token = page.next_page_token
            if not token:
                break
        self.assertEqual([r.chunk.index for r in results], [0, 1, 2])
        self.assertEqual(
            [r.chunk.state for r in results],
            [scheduler_pb2.CHUNK_STATE_ABORTED, scheduler_pb2.CHUNK_STATE_ABORTED, scheduler_pb2.CHUNK_STATE_COMMITTED],
        )
        errors = {e.index: e for r in results for e in r.errors}
        self.assertEqual({i: e.field for i, e in errors.items()}, bad)
        for e in errors.values():
            self.assertTrue(e.reason, e)
        self.assertIn("required", errors[7].reason)
        # an aborted chunk commits nothing; the good chunk is there
        missing = self.rpc_error(self.intake.Get, intake_pb2.GetRequest(object="item", id="b00"))
        self.assertEqual(missing.code(), grpc.StatusCode.NOT_FOUND)
        got = self.call(self.intake.Get, intake_pb2.GetRequest(object="item", id="b11"))
        self.assertEqual(got.fields["n"].integer_value, BIG + 11)

    def test_an_export_read_to_the_end_has_every_record_once(self):
        total = 300
        expected = {f"r{i:03}": 2**62 + i for i in range(total)}
        codes = sorted(expected)
        for start in range(0, total, 100):
            records = [fields(code=string(c), name=string("x"), n=integer(expected[c])) for c in codes[start:start + 100]]
            self.call(self.intake.Upsert, intake_pb2.UpsertRequest(object="row", records=records))

        answer = self.call(self.intake.Export, intake_pb2.ExportRequest(object="row", sync_rows=25, part_rows=40))
        self.assertFalse(answer.complete)
        self.assertEqual(answer.reason, intake_pb2.EXPORT_REASON_LARGE_RESULTS)
        self.assertEqual(len(answer.records), 25)
        seen = collections.Counter()
        values = {}
        for r in answer.records:
            seen[r.id] += 1
            values[r.id] = r.fields["n"].integer_value

        # WatchExport ends once the export is complete (or failed, or cancelled)
        status = None
        for status in self.intake.WatchExport(
            intake_pb2.WatchExportRequest(token=answer.token), metadata=self.auth, timeout=WAIT_TIMEOUT
        ):
            pass
        self.assertIsNotNone(status)
        self.assertEqual(status.state, intake_pb2.EXPORT_STATE_COMPLETE, status.error)
        status = self.call(self.intake.GetExport, intake_pb2.GetExportRequest(token=answer.token))
        self.assertTrue(status.total_known)
        self.assertEqual(len(status.parts), status.parts_total)
        self.assertEqual(status.parts_ready, status.parts_total)
        self.assertGreater(status.parts_total, 1)
        self.assertEqual(status.estimated_total, total)

        # the part numbers the status lists, whatever they start from
        for part in status.parts:
            rows = 0
            for frame in self.intake.FetchPart(
                intake_pb2.FetchPartRequest(token=answer.token, part=part.number), metadata=self.auth,
                timeout=CALL_TIMEOUT,
            ):
                for r in frame.records:
                    seen[r.id] += 1
                    values[r.id] = r.fields["n"].integer_value
                rows += len(frame.records)
            self.assertEqual(rows, part.rows, f"part {part.number}")
        beyond = max(p.number for p in status.parts) + 1
        with self.assertRaises(grpc.RpcError) as caught:
            for _ in self.intake.FetchPart(
                intake_pb2.FetchPartRequest(token=answer.token, part=beyond), metadata=self.auth, timeout=CALL_TIMEOUT
            ):
                pass
        self.assertEqual(caught.exception.code(), grpc.StatusCode.OUT_OF_RANGE)

        self.assertEqual({k: v for k, v in seen.items() if v != 1}, {}, "records seen more than once")
        self.assertEqual(set(seen), set(expected))
        self.assertEqual(values, expected)

    def test_errors_carry_error_info_and_bad_request(self):
        # NOT_FOUND: a missing record
        err = self.rpc_error(self.intake.Get, intake_pb2.GetRequest(object="item", id="no-such-record"))
        self.assertEqual(err.code(), grpc.StatusCode.NOT_FOUND)
        _, details = error_details(err)
        info = details["ErrorInfo"]
        self.assertEqual((info.domain, info.reason), ("baton.dev", "RECORD_NOT_FOUND"))

        # NOT_FOUND: an object the org does not define
        err = self.rpc_error(self.intake.Get, intake_pb2.GetRequest(object="nope", id="x"))
        self.assertEqual(err.code(), grpc.StatusCode.NOT_FOUND)
        info = error_details(err)[1]["ErrorInfo"]
        self.assertEqual((info.domain, info.reason), ("baton.dev", "OBJECT_NOT_FOUND"))

        # RESOURCE_EXHAUSTED: more records than a real-time request takes (default 200)
        records = [fields(code=string(f"over{i}"), name=string("o")) for i in range(201)]
        err = self.rpc_error(self.intake.Upsert, intake_pb2.UpsertRequest(object="item", records=records))
        self.assertEqual(err.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        info = error_details(err)[1]["ErrorInfo"]
        self.assertEqual((info.domain, info.reason), ("baton.dev", "RESUBMIT_AS_BATCH"))
        self.assertEqual(dict(info.metadata), {"limit_name": "max_records", "limit": "200", "observed": "201"})
        err = self.rpc_error(self.intake.Get, intake_pb2.GetRequest(object="item", id="over0"))
        self.assertEqual(err.code(), grpc.StatusCode.NOT_FOUND, "a request over a limit commits nothing")

        # RESOURCE_EXHAUSTED: a query page over the limit
        err = self.rpc_error(self.intake.Query, intake_pb2.QueryRequest(object="item", page_size=201))
        self.assertEqual(err.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        info = error_details(err)[1]["ErrorInfo"]
        self.assertEqual((info.domain, info.reason), ("baton.dev", "RESUBMIT_AS_EXPORT"))

        # INVALID_ARGUMENT: a value outside the signed 64-bit range, and a wrong type
        records = [
            fields(code=string("ok"), name=string("o"), n=integer(1)),
            fields(code=string("huge"), name=string("h"), n=decimal("9300000000000000000")),
            fields(code=string("text"), name=string("t"), n=string("seven")),
        ]
        err = self.rpc_error(self.intake.Upsert, intake_pb2.UpsertRequest(object="item", records=records))
        self.assertEqual(err.code(), grpc.StatusCode.INVALID_ARGUMENT)
        violations = {v.field: v.description for v in error_details(err)[1]["BadRequest"].field_violations}
        self.assertEqual(set(violations), {"records[1].n", "records[2].n"}, violations)
        self.assertIn("outside the signed 64-bit integer range", violations["records[1].n"])

        # INVALID_ARGUMENT: a filter on an unknown field says where
        err = self.rpc_error(self.intake.Query, intake_pb2.QueryRequest(object="item", filter="n = 1 AND nope = 2"))
        self.assertEqual(err.code(), grpc.StatusCode.INVALID_ARGUMENT)
        violations = error_details(err)[1]["BadRequest"].field_violations
        self.assertEqual([v.field for v in violations], ["filter"])
        self.assertTrue(violations[0].description.startswith("at 10:"), violations[0].description)


if __name__ == "__main__":
    unittest.main()
