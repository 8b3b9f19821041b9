#!/usr/bin/env python3
"""A stand-in for QEMU's virtio-serial chardev, for the transport tests.

It makes a pseudo-terminal pair in raw mode. The slave end plays the guest's
/dev/virtio-ports/org.nestbroker.0 (a character device the guest agent opens once and
uses with read/write); the master end is bridged to a unix socket server at argv[1],
as QEMU's `-chardev socket,path=...,server=on,wait=off` bridges the port to the host.
One client at a time; a new client replaces the old. The master is read only while a
client is connected, so what the guest writes meanwhile stays in the kernel (the guest
sees EAGAIN once the buffer is full), as with QEMU.

Prints the slave's path on its first line, then "ready". SIGTERM closes the master: the
guest's read() then returns 0 (EOF), as virtio-serial's does when the host goes.
"""
import os
import select
import signal
import socket
import sys
import tty

sock_path = sys.argv[1]
master, slave = os.openpty()
tty.setraw(slave)  # no echo, no line discipline: bytes pass unchanged both ways
print(os.ttyname(slave), flush=True)

srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(sock_path)
srv.listen(4)
client = None
running = True


def stop(_sig, _frm):
    global running
    running = False


signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)

while running:
    rlist = [srv] + ([master, client] if client else [])
    try:
        ready, _, _ = select.select(rlist, [], [], 0.2)
    except InterruptedError:
        continue
    for r in ready:
        if r is srv:
            new, _ = srv.accept()
            if client:
                client.close()
            client = new
        elif r is master:
            try:
                data = os.read(master, 65536)
            except OSError:
                data = b""
            if data and client:
                try:
                    client.sendall(data)
                except OSError:
                    client.close()
                    client = None
        elif client is not None and r is client:
            try:
                data = client.recv(65536)
            except OSError:
                data = b""
            if not data:
                client.close()
                client = None
            else:
                os.write(master, data)

os.close(master)
os.close(slave)
srv.close()
os.unlink(sock_path)
