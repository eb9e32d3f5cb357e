"""The API core on one machine with LitServe: `server` assembles and runs it, `api` is the thin
LitAPI, `queue` bounds and cancels queued work, `watchdog` answers requests that would never be,
and `patches` holds every use of LitServe beyond its public API."""
