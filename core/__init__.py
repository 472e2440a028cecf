"""What every app shares and no app owns: domain errors, rate limiting, the thread pool for
blocking work. Nothing here imports an app."""
