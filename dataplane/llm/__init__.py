"""LLM traffic: what the gateway understands of model APIs (OpenAI, Anthropic). For now the token
usage a response reports (`usage`), which budgets and token limits are charged with."""
