#!/usr/bin/env python3
"""Clients of bench/burst.sh, on plain sockets (standard library only).

  burst_client.py gen CHANNEL COUNT SIZE
      writes COUNT Redis PUBLISH commands (RESP, for `redis-cli --pipe`) of
      SIZE-byte payloads "seq=<n> xxx..." to stdout.
  burst_client.py read PORT PATH COUNT TIMEOUT
      opens GET PATH on 127.0.0.1:PORT and reads as fast as it can until
      COUNT events, the end of the stream, or TIMEOUT seconds.
  burst_client.py stall PORT PATH GOFILE TIMEOUT
      opens GET PATH with a small receive buffer and never reads, until
      GOFILE exists (or TIMEOUT seconds); then reads what is there and tells
      whether the server had closed the stream (EOF or reset within 3 s) or
      still holds it open.

  burst_client.py count FILE ENDED
      counts the events of a stream saved in FILE (curl's output).

read, stall and count print one JSON line: events (data lines), first and last
sequence number seen, in_order, bytes, ended (EOF, reset, timeout or count)
and seconds.
"""

import json
import os
import socket
import sys
import time


def gen(channel, count, size):
    out = sys.stdout.buffer
    ch = channel.encode()
    for i in range(1, count + 1):
        payload = b"seq=%d " % i
        payload += b"x" * max(0, size - len(payload))
        out.write(b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(ch), ch, len(payload), payload))
    out.flush()


def connect(port, path, rcvbuf=0):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        # Before connect, so that the window the server sees is small.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    s.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept: text/event-stream\r\n\r\n" % (path, port)).encode())
    return s


class Counter:
    """Counts the data lines of an event stream and checks their order."""

    def __init__(self):
        self.rest = b""
        self.events = 0
        self.first = None
        self.last = None
        self.in_order = True
        self.bytes = 0

    def feed(self, b):
        self.bytes += len(b)
        lines = (self.rest + b).split(b"\n")
        self.rest = lines.pop()
        for line in lines:
            if not line.startswith(b"data: seq="):
                continue
            self.events += 1
            n = int(line[10:].split(b" ", 1)[0])
            if self.last is not None and n != self.last + 1:
                self.in_order = False
            if self.first is None:
                self.first = n
            self.last = n

    def report(self, ended, start):
        return {"events": self.events, "first": self.first, "last": self.last, "in_order": self.in_order,
                "bytes": self.bytes, "ended": ended, "seconds": round(time.monotonic() - start, 3)}


def read(port, path, count, timeout):
    start = time.monotonic()
    s = connect(port, path)
    c = Counter()
    ended = "timeout"
    deadline = start + timeout
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            b = s.recv(1 << 16)
        except socket.timeout:
            break
        except ConnectionResetError:
            ended = "reset"
            break
        if not b:
            ended = "EOF"
            break
        c.feed(b)
        if c.events >= count:
            ended = "count"
            break
    s.close()
    print(json.dumps(c.report(ended, start)), flush=True)


def stall(port, path, gofile, timeout):
    start = time.monotonic()
    s = connect(port, path, rcvbuf=4096)
    deadline = start + timeout
    while not os.path.exists(gofile) and time.monotonic() < deadline:
        time.sleep(0.05)
    # Now drain: a stream the server closed ends in EOF (or a reset) once
    # the bytes it had sent are read; one it still holds stays silent.
    c = Counter()
    ended = "open"
    while True:
        s.settimeout(3)
        try:
            b = s.recv(1 << 16)
        except socket.timeout:
            break
        except ConnectionResetError:
            ended = "reset"
            break
        if not b:
            ended = "EOF"
            break
        c.feed(b)
        if time.monotonic() > deadline + 30:
            break
    s.close()
    print(json.dumps(c.report(ended, start)), flush=True)


def count(path, ended):
    c = Counter()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 16)
            if not b:
                break
            c.feed(b)
    r = c.report(ended, time.monotonic())
    del r["seconds"]
    print(json.dumps(r), flush=True)


def main():
    a = sys.argv[1:]
    if len(a) == 4 and a[0] == "gen":
        gen(a[1], int(a[2]), int(a[3]))
    elif len(a) == 5 and a[0] == "read":
        read(int(a[1]), a[2], int(a[3]), float(a[4]))
    elif len(a) == 3 and a[0] == "count":
        count(a[1], a[2])
    elif len(a) == 5 and a[0] == "stall":
        stall(int(a[1]), a[2], a[3], float(a[4]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
