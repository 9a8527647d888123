"""The proxy's downstream side: listeners, HTTP/1.1 and HTTP/2 connections, the forwarding handler.

Entry point: `dataplane.http.server.ProxyServer`. Modules stay importable one by one (this
package imports nothing) so `dataplane.upstream` can share the HTTP/1.1 codec without a cycle.
"""
