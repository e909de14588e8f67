"""The cache daemon: a TieredStore in its own process, shared by engine processes.

`server.py` runs in the `kvdepot serve` process; `client.py` runs in engine processes and
implements the same `ChunkStore` interface as the embedded store. Control messages travel
over a socket (`protocol.py`); KV bytes never do: they live in a shared-memory RAM tier that
both sides map (`HostBuffer.create_shared` / `map_shared`).
"""
