"""Exit statuses of `tensorwire client` and of training scripts that use `fl.client`.

    status  tensorwire client (both modes)                     a script using fl.client
    0       the job finished; the server stopped the job;      the same
            stopped by SIGTERM/SIGINT (after telling the
            server: the round goes on without this site)
    1       failure: the server was unreachable for longer     an uncaught error (its traceback)
            than connect_timeout (at start) or idle_timeout
            (later); the script kept failing (more than
            max_restarts times); an unexpected error
    2       configuration or usage error (bad config file or   argparse's usage error
            flag, missing script, the script exited 2): fix
            the configuration, a restart will not help; found
            before anything starts and reported as one line
            naming the file, the field and the fix
    69      -                                                  lost the server (EX_UNAVAILABLE):
                                                               `tensorwire client` does not
                                                               restart the script and exits 1
    77      not admitted: the server refused this site's       the same (EX_NOPERM)
            token or certificate; a restart would be refused
            the same way (systemd: RestartPreventExitStatus)

`tensorwire server` exits 0 when its job finished or SIGTERM/SIGINT stopped it (its clients were
told to stop first), 2 on a configuration error (one line naming the file, field and fix; the
traceback only with --debug), and 1 when it failed: a server restarted after a
failure continues the job from its state directory, so systemd restarts it on failure only.
"""

from __future__ import annotations

from typing import Final

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
# A script gave up on its server (unreachable for connect_timeout, or lost for idle_timeout): it
# already waited as long as it was told to, so the client daemon does not restart it.
EXIT_SERVER_LOST: Final = 69
# The server refused the site's credentials: no restart would be admitted either.
EXIT_NOT_ADMITTED: Final = 77


def daemon_status(script_status: object) -> int:
    """What `tensorwire client` exits with once its script ended with `script_status` (an exit
    code, or a SystemExit's code: None is 0, a message is 1) and will not be restarted."""
    if script_status is None:
        return EXIT_OK
    if not isinstance(script_status, int):
        return EXIT_FAILURE
    if script_status in (EXIT_OK, EXIT_USAGE, EXIT_NOT_ADMITTED):
        return script_status
    return EXIT_FAILURE
