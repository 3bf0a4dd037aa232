#!/bin/sh
# keepalived's notify hook for conntrackd: `primary-backup.sh primary|backup|fault`.
# primary: take over the connections the other gateway carried (commit the external
#          cache into the kernel), then resynchronise both ways.
# backup:  start from what the new master has (flush, request a full resync).
set -u
CONNTRACKD=/usr/sbin/conntrackd
CONF=/etc/conntrackd/conntrackd.conf

case "${1:-}" in
primary)
    $CONNTRACKD -C $CONF -c      # commit the external cache into the kernel table
    $CONNTRACKD -C $CONF -f      # flush the internal and external caches
    $CONNTRACKD -C $CONF -R      # resync the internal cache with the kernel table
    $CONNTRACKD -C $CONF -B      # send a bulk update to the other node
    ;;
backup)
    $CONNTRACKD -C $CONF -t      # shorten the kernel table's timers (the master has them)
    $CONNTRACKD -C $CONF -n      # ask the other node for a full resync
    ;;
fault)
    $CONNTRACKD -C $CONF -t
    ;;
*)
    echo "usage: $0 primary|backup|fault" >&2
    exit 2
    ;;
esac
exit 0
