"""`edgekv serve`: an OpenAI-compatible chat server that keeps every conversation's media cache compacted."""
