/**
 * The production host↔guest channel on KVM: a virtio-serial port (docs/install.md).
 *
 * Guest side. udev links `/dev/virtio-ports/org.nestbroker.0` to the port's character
 * device (`/dev/vportNpM`). It is not a socket (net.Socket cannot wrap it), and it is
 * exclusive, so we open it ONCE and use fs.read/fs.write on the descriptor. What the
 * kernel does (drivers/char/virtio_console.c, port_fops_read / port_fops_write):
 *
 *   - read with no data: returns 0 (EOF) at once while no host is connected to the
 *     chardev; otherwise blocks, or fails EAGAIN under O_NONBLOCK.
 *   - write: blocks while the host is not connected (or its buffers are full), or fails
 *     EAGAIN under O_NONBLOCK.
 *
 * So the descriptor is opened O_NONBLOCK: neither the event loop nor a libuv thread ever
 * waits in the kernel. Reads poll: EOF means "no host" (poll every `eofPollMs`, never
 * close), EAGAIN means "host connected, nothing to read" (poll every `idlePollMinMs`,
 * doubling to `idlePollMaxMs` while idle, so a notice after a quiet spell waits at most
 * that long); data means read again at once. Writes go through a queue; EAGAIN retries
 * later. The EOF→EAGAIN transitions give `open`/`close`. A host that disconnects and
 * reconnects between two polls is caught by the 0xFF every connection starts with (see
 * channel.ts): a 0xFF after lines from the same host is a new host connection.
 *
 * Host side: QEMU bridges the port to a unix socket; the host broker uses connectUnix.
 *
 *   qemu: -device virtio-serial
 *         -chardev socket,id=ch0,path=/run/nestbroker/vm1.sock,server=on,wait=off
 *         -device virtserialport,chardev=ch0,name=org.nestbroker.0
 *
 *   libvirt domain XML (inside <devices>):
 *     <channel type='unix'>
 *       <source mode='bind' path='/run/nestbroker/vm1.sock'/>
 *       <target type='virtio' name='org.nestbroker.0'/>
 *     </channel>
 */
import fs from 'node:fs';
import { ChannelBase, type ChannelOptions } from './channel';

export const DEFAULT_VIRTIO_PORT = '/dev/virtio-ports/org.nestbroker.0';

export interface VirtioSerialOptions extends ChannelOptions {
  path?: string;
  /** Poll interval while no host is connected (reads return EOF). */
  eofPollMs?: number;
  /** Poll interval right after traffic while a host is connected; doubles while idle... */
  idlePollMinMs?: number;
  /** ...up to this: the longest a message from the host waits before we read it. */
  idlePollMaxMs?: number;
  /** Backoff for (re)opening the device (missing at boot until udev links it, or unplugged). */
  reopenInitialMs?: number;
  reopenMaxMs?: number;
}

const READ_CHUNK = 64 * 1024;

export class VirtioSerialChannel extends ChannelBase {
  readonly path: string;
  private readonly eofPollMs: number;
  private readonly idleMin: number;
  private readonly idleMax: number;
  private readonly reopenInitial: number;
  private readonly reopenMax: number;

  private fd: number | null = null;
  private readonly readBuf = Buffer.alloc(READ_CHUNK);
  private idleDelay: number;
  private reopenDelay: number;
  private timers = new Set<NodeJS.Timeout>();
  /** fs operations in flight on `fd`: the descriptor is closed only when none is. */
  private inflight = 0;
  private onIdle: (() => void) | null = null;

  private queue: Buffer[] = [];
  private queuedBytes = 0;
  private writing: { buf: Buffer; off: number } | null = null;
  private writeDelay: number;
  /** Messages dropped because the host left them unread past maxBufferedBytes. */
  dropped = 0;

  private constructor(opts: VirtioSerialOptions) {
    super(opts);
    this.path = opts.path ?? DEFAULT_VIRTIO_PORT;
    this.eofPollMs = opts.eofPollMs ?? 200;
    this.idleMin = opts.idlePollMinMs ?? 2;
    this.idleMax = opts.idlePollMaxMs ?? 50;
    this.reopenInitial = opts.reopenInitialMs ?? 250;
    this.reopenMax = opts.reopenMaxMs ?? 5000;
    this.idleDelay = this.idleMin;
    this.writeDelay = this.idleMin;
    this.reopenDelay = this.reopenInitial;
  }

  /** Starts opening the port; returns at once (the device may appear later). */
  static open(opts: VirtioSerialOptions = {}): VirtioSerialChannel {
    const ch = new VirtioSerialChannel(opts);
    ch.openDevice();
    return ch;
  }

  /** Messages waiting for the host to read the port (the kernel said EAGAIN). */
  get pendingWrites(): number {
    return this.queue.length + (this.writing ? 1 : 0);
  }

  /** The port is open (whether or not a host is connected to it). */
  get deviceOpen(): boolean {
    return this.fd !== null;
  }

  async close(): Promise<void> {
    if (this.ended) return;
    this.ended = true;
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
    this.peerDown();
    await this.closeFd();
  }

  protected write(line: Buffer): void {
    this.queue.push(line);
    this.queuedBytes += line.length;
    // The host is connected but not reading: keep the newest, log what we drop.
    while (this.queuedBytes > this.maxBufferedBytes && this.queue.length > 1) {
      const old = this.queue.shift() as Buffer;
      this.queuedBytes -= old.length;
      this.dropped++;
      this.log.warn({ bytes: old.length }, 'host is not reading the port: oldest message dropped');
    }
    this.pump();
  }

  protected override peerDown(): void {
    // What was queued was for the host that left; the protocol resends after a reconnect.
    this.queue = [];
    this.queuedBytes = 0;
    this.writing = null;
    super.peerDown();
  }

  protected override onResync(): void {
    if (this.linesSinceOpen > 0) {
      this.log.info('0xFF after traffic: a new host connection on the port');
      this.peerDown();
      this.peerUp();
    }
  }

  private openDevice(): void {
    if (this.ended) return;
    const flags = fs.constants.O_RDWR | fs.constants.O_NONBLOCK | fs.constants.O_NOCTTY;
    fs.open(this.path, flags, (err, fd) => {
      if (this.ended) {
        if (!err) fs.close(fd, () => undefined);
        return;
      }
      if (err) {
        this.log.warn(
          { code: err.code, path: this.path, retryMs: this.reopenDelay },
          'cannot open the virtio-serial port yet',
        );
        this.later(() => this.openDevice(), this.reopenDelay);
        this.reopenDelay = Math.min(this.reopenDelay * 2, this.reopenMax);
        return;
      }
      this.fd = fd;
      this.reopenDelay = this.reopenInitial;
      this.log.info({ path: this.path }, 'virtio-serial port open');
      this.readLoop();
    });
  }

  private readLoop(): void {
    const fd = this.fd;
    if (this.ended || fd === null) return;
    this.inflight++;
    fs.read(fd, this.readBuf, 0, READ_CHUNK, null, (err, n) => {
      this.settled();
      if (this.ended || this.fd !== fd) return;
      if (err) {
        if (err.code === 'EAGAIN' || err.code === 'EWOULDBLOCK') {
          // A host is connected; nothing to read yet.
          this.peerUp();
          this.pump();
          this.later(() => this.readLoop(), this.idleDelay);
          this.idleDelay = Math.min(this.idleDelay * 2, this.idleMax);
          return;
        }
        this.deviceLost(err);
        return;
      }
      if (n === 0) {
        // EOF: no host on the chardev. Not the end: keep the port and poll.
        this.peerDown();
        this.later(() => this.readLoop(), this.eofPollMs);
        return;
      }
      this.peerUp();
      this.idleDelay = this.idleMin;
      this.received(this.readBuf.subarray(0, n));
      setImmediate(() => this.readLoop());
    });
  }

  private pump(): void {
    const fd = this.fd;
    if (this.ended || fd === null || this.inflightWrite) return;
    if (!this.writing) {
      const next = this.queue.shift();
      if (!next) return;
      this.queuedBytes -= next.length;
      this.writing = { buf: next, off: 0 };
    }
    const w = this.writing;
    this.inflightWrite = true;
    this.inflight++;
    fs.write(fd, w.buf, w.off, w.buf.length - w.off, null, (err, n) => {
      this.inflightWrite = false;
      this.settled();
      if (this.ended || this.fd !== fd) return;
      if (err) {
        // EAGAIN: the host is not connected or not reading. EIO: what a pseudo-terminal
        // says when its other end is gone (the tests' stand-in for the port).
        if (err.code === 'EAGAIN' || err.code === 'EWOULDBLOCK' || err.code === 'EIO') {
          this.later(() => this.pump(), this.writeDelay);
          this.writeDelay = Math.min(this.writeDelay * 2, this.eofPollMs);
          return;
        }
        this.deviceLost(err);
        return;
      }
      this.writeDelay = this.idleMin;
      if (this.writing === w) {
        w.off += n;
        if (w.off >= w.buf.length) this.writing = null;
      }
      this.pump();
    });
  }

  private inflightWrite = false;

  /** ENODEV (the port was unplugged), EBADF...: close and open again with backoff. */
  private deviceLost(err: NodeJS.ErrnoException): void {
    this.log.warn({ code: err.code, path: this.path }, 'virtio-serial port failed: reopening');
    this.peerDown();
    void this.closeFd().then(() => {
      this.later(() => this.openDevice(), this.reopenDelay);
      this.reopenDelay = Math.min(this.reopenDelay * 2, this.reopenMax);
    });
  }

  private closeFd(): Promise<void> {
    const fd = this.fd;
    this.fd = null;
    if (fd === null) return Promise.resolve();
    // Closing while a read or write is in flight could hit a reused descriptor number.
    return new Promise<void>((resolve) => {
      const doClose = (): void => fs.close(fd, () => resolve());
      if (this.inflight === 0) doClose();
      else this.onIdle = doClose;
    });
  }

  private settled(): void {
    this.inflight--;
    if (this.inflight === 0 && this.onIdle) {
      const f = this.onIdle;
      this.onIdle = null;
      f();
    }
  }

  private later(fn: () => void, ms: number): void {
    if (this.ended) return;
    const t = setTimeout(() => {
      this.timers.delete(t);
      fn();
    }, ms);
    this.timers.add(t);
  }
}
