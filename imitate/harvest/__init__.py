"""The async harvester: sources → system-message sampler → limiter → client → gates → journal."""
