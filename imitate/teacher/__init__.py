"""Talking to teachers: the OpenAI-compatible client (the only openai importer), the pure rate limiter,
header parsing, and a loopback fake teacher for tests, the demo and benchmarks."""
