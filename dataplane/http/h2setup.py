"""How every HTTP/2 connection of the proxy starts, downstream and upstream alike.

One place for the settings policy: our receive windows (larger than the protocol's
64 KiB default, so a fast peer is not throttled by round trips) and the header-list
bound that keeps one peer from making us decode unbounded headers.
"""

from __future__ import annotations

import h2.connection
import h2.settings

_DEFAULT_CONNECTION_WINDOW = 65535


def start_connection(
    conn: h2.connection.H2Connection,
    *,
    client: bool,
    stream_window: int,
    connection_window: int,
    max_header_list_size: int,
    max_concurrent_streams: int | None = None,
) -> None:
    """Apply our local settings, queue the preface and widen the connection window."""
    values = {
        h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
        h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list_size,
    }
    if client:
        values[h2.settings.SettingCodes.ENABLE_PUSH] = 0
    if max_concurrent_streams is not None:
        values[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = max_concurrent_streams
    conn.local_settings = h2.settings.Settings(client=client, initial_values=values)
    conn.decoder.max_header_list_size = max_header_list_size
    conn.initiate_connection()
    extra = connection_window - _DEFAULT_CONNECTION_WINDOW
    if extra > 0:
        conn.increment_flow_control_window(extra)
