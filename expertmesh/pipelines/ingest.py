"""Context ingestion: register a large file or a Parquet dataset as a context of a running mesh.

Runs as a Ray job (`expertmesh submit ingest ...`) or directly:

    python -m expertmesh.pipelines.ingest --file book.txt --mesh expertmesh --owner acme --visibility shared
    python -m expertmesh.pipelines.ingest --parquet s3://bucket/docs/ --column text --mesh expertmesh

Parquet input is read with Ray Data (any pyarrow filesystem URI); rows are joined in order
with a separator. Progress is printed as the text is read and tokenised.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def read_text(file: str | None, parquet: str | None, column: str, separator: str) -> str:
    if file is not None:
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(file) if "://" in file else (pafs.LocalFileSystem(), file)
        size = fs.get_file_info(path).size or 0
        chunks, done = [], 0
        with fs.open_input_stream(path) as f:
            while block := f.read(1 << 24):
                chunks.append(block)
                done += len(block)
                print(f"read {done / 2**20:.1f} / {size / 2**20:.1f} MiB", file=sys.stderr, flush=True)
        return b"".join(chunks).decode("utf-8")
    import ray

    ds = ray.data.read_parquet(parquet, columns=[column])
    parts, rows = [], 0
    for batch in ds.iter_batches(batch_size=4096, batch_format="pyarrow"):
        parts.extend(str(x) for x in batch.column(column).to_pylist())
        rows += batch.num_rows
        print(f"read {rows} rows", file=sys.stderr, flush=True)
    return separator.join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="expertmesh-ingest", description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--file", help="text file (path or URI)")
    src.add_argument("--parquet", help="Parquet file or directory (path or URI), read with Ray Data")
    ap.add_argument("--column", default="text", help="Parquet column holding the text")
    ap.add_argument("--separator", default="\n\n", help="joins Parquet rows")
    ap.add_argument("--mesh", default="expertmesh", help="name of the running mesh (Mesh.start(name=...))")
    ap.add_argument("--address", default="auto")
    ap.add_argument("--mode", choices=("exact", "blockwise"), default="blockwise")
    ap.add_argument("--owner", default="default", help="tenant that owns the context")
    ap.add_argument("--visibility", choices=("private", "shared"), default="shared")
    ap.add_argument("--name", default=None, help="label of the context")
    args = ap.parse_args(argv)

    import ray

    import expertmesh as em
    from expertmesh.pipelines.progress import registration_bar

    ray.init(address=args.address, log_to_driver=False)
    mesh = em.Mesh.attach(args.mesh)
    t0 = time.perf_counter()
    text = read_text(args.file, args.parquet, args.column, args.separator)
    ids = mesh.tokenizer.encode(text)
    print(f"tokenised {len(text):,} characters into {len(ids):,} tokens in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with registration_bar(len(ids)) as progress:  # tokens/s and the time left, on stderr (the job's log)
        info = mesh.register_context(ids, mode=args.mode, owner=args.owner, visibility=args.visibility,
                                     name=args.name, progress=progress)
    print(f"registered {info.num_tokens:,} tokens over shards {list(info.shards)} in "
          f"{time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    print(json.dumps({"id": info.id, "num_tokens": info.num_tokens, "shards": list(info.shards),
                      "owner": info.owner, "visibility": info.visibility, "name": info.name}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
