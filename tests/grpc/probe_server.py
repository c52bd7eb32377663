"""gRPC probe server for the mesh end-to-end tests: service mesh.Probe, no generated code.

Who answers with the pod name (raw UTF-8 bytes, no protobuf: the mesh only sees gRPC framing).
Fail fails with the status named in metadata x-grpc-status when this pod is listed in
x-fail-pods, so a test scripts failures per call without restarting pods. Both send the pod name
as initial metadata first, so a failure is HEADERS then trailers carrying grpc-status; with
metadata x-initial-metadata=no they do not, and a failure is one trailers-only response.
Count answers the number of Who and Fail calls this server received (itself not counted), asked
from inside the pod: what the server saw, whatever the clients were told.
"""
import argparse
import signal
import sys
import threading
from concurrent import futures

import grpc

SERVICE = "mesh.Probe"


class Probe:
    def __init__(self, name, fail_every):
        self.name = name
        self.fail_every = fail_every
        self.who_calls = 0
        self.calls = 0
        # grpc runs handlers on a thread pool; the Nth-call counter must not race.
        self.lock = threading.Lock()

    def _identify(self, context):
        with self.lock:
            self.calls += 1
        # Initial metadata reaches the client even when the call then fails; the trailer covers
        # trailers-only answers.
        if dict(context.invocation_metadata()).get("x-initial-metadata", "").strip() != "no":
            context.send_initial_metadata((("x-pod", self.name),))
        context.set_trailing_metadata((("x-pod", self.name),))

    def count(self, request, context):
        with self.lock:
            return str(self.calls).encode()

    def who(self, request, context):
        self._identify(context)
        with self.lock:
            self.who_calls += 1
            n = self.who_calls
        if self.fail_every and n % self.fail_every == 0:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name}: every {self.fail_every}th call fails")
        return self.name.encode()

    def fail(self, request, context):
        self._identify(context)
        metadata = dict(context.invocation_metadata())
        pods = [p.strip() for p in metadata.get("x-fail-pods", "").split(",")]
        if self.name in pods:
            wanted = metadata.get("x-grpc-status", "UNAVAILABLE").strip().upper()
            code = grpc.StatusCode.__members__.get(wanted, grpc.StatusCode.UNKNOWN)
            context.abort(code, f"{self.name}: failing with {wanted} as asked")
        return self.name.encode()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fail-every", type=int, default=0)
    args = parser.parse_args()

    probe = Probe(args.name, args.fail_every)
    # No (de)serializers: handlers get and return raw bytes.
    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Who": grpc.unary_unary_rpc_method_handler(probe.who),
        "Fail": grpc.unary_unary_rpc_method_handler(probe.fail),
        "Count": grpc.unary_unary_rpc_method_handler(probe.count),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((handler,))
    if server.add_insecure_port(f"0.0.0.0:{args.port}") == 0:
        print(f"probe_server: cannot listen on port {args.port}", file=sys.stderr)
        sys.exit(1)
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    signal.signal(signal.SIGINT, lambda *_: server.stop(0))
    server.wait_for_termination()


if __name__ == "__main__":
    main()
