"""Living with it: status, doctor, the control socket, systemd, the phone page, backups."""
