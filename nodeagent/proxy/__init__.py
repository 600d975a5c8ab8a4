"""The shared L7 proxy runtime (asyncio Protocols + httptools); see docs/proxy.md."""
