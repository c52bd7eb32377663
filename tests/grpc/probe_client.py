"""gRPC probe client: N sequential unary calls to mesh.Probe over ONE channel.

One channel is one long-lived HTTP/2 connection, so which pod answers each call shows whether the
mesh balances per request rather than per connection. Prints one JSON line:
{"calls": N, "by_pod": {...}, "by_code": {"OK": n, ...}, "pods_in_order": [...], "last_reply": "..."}.
by_pod counts every call a pod answered (its x-pod metadata or reply), whatever the code.
"""
import argparse
import json
import sys

import grpc


def metadata_pairs(values):
    pairs = []
    for value in values:
        key, sep, val = value.partition("=")
        if not sep:
            sys.exit(f"probe_client: --metadata {value!r} is not k=v")
        pairs.append((key.strip().lower(), val))
    return tuple(pairs)


def pod_of(*metadata_lists):
    for metadata in metadata_lists:
        for key, value in metadata or ():
            if key == "x-pod":
                return value
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", required=True, help="HOST:PORT")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--method", default="Who")
    parser.add_argument("--metadata", action="append", default=[], help="k=v, repeatable")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per call")
    args = parser.parse_args()

    metadata = metadata_pairs(args.metadata)
    # grpc's own retries and any proxy from the environment would hide what the mesh does.
    options = [("grpc.enable_retries", 0), ("grpc.enable_http_proxy", 0)]
    by_pod, by_code, order, last_reply = {}, {}, [], None
    with grpc.insecure_channel(args.target, options=options) as channel:
        call = channel.unary_unary(f"/mesh.Probe/{args.method}")
        for _ in range(args.count):
            try:
                reply, info = call.with_call(b"", metadata=metadata, timeout=args.timeout)
                code = grpc.StatusCode.OK
                last_reply = reply.decode(errors="replace")
                pod = last_reply or pod_of(info.initial_metadata())
            except grpc.RpcError as e:
                code = e.code()
                pod = pod_of(e.initial_metadata(), e.trailing_metadata())
            by_code[code.name] = by_code.get(code.name, 0) + 1
            if pod is not None:
                by_pod[pod] = by_pod.get(pod, 0) + 1
            if len(order) < 200:
                order.append(pod or "-")
    print(json.dumps({"calls": args.count, "by_pod": by_pod, "by_code": by_code, "pods_in_order": order, "last_reply": last_reply}))


if __name__ == "__main__":
    main()
