"""cachecade's HTTP surface: OpenAI-compatible routes, the request pipeline, upstream client and admin API."""
