"""The proxy's upstream side: connections to backends, pooled per (backend, target).

`pool.UpstreamPools` is the entry point; an exchange (one request/response) comes from
`Http1Pool` or `Http2Pool` and follows the `Exchange` protocol in `exchange.py`.
"""
