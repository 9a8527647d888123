"""Policy on the request path: who is calling (authentication), may they (CEL authorization), how much
(local and global limits, token budgets). Each module compiles its config once, when a snapshot is
applied, into objects the request path only evaluates."""
