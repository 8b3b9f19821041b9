/**
 * The host↔guest channel over a unix socket, for one machine (the demo, tests): the
 * guest agent listens where QEMU's chardev socket would be, and the host broker connects
 * to it exactly as it connects to a QEMU chardev (`-chardev socket,path=...,server=on`,
 * or libvirt `<channel type='unix'>`: see virtio-serial.ts).
 */
import { promises as fsp } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { NestError } from '../common/errors';
import { removeStaleSocket } from '../common/rpc';
import { SocketBackedChannel, SocketChannel, type ChannelOptions } from './channel';

export interface UnixServerOptions extends ChannelOptions {
  /** Mode of the socket file (default 0o600: only the host broker, as root, connects). */
  mode?: number;
}

/** Guest side: listens on `path`; one host connection at a time, a new one replaces the old. */
export class UnixChannelServer extends SocketBackedChannel {
  private server: net.Server | null = null;

  private constructor(
    readonly path: string,
    opts: ChannelOptions,
  ) {
    super(opts);
  }

  static async listen(
    socketPath: string,
    opts: UnixServerOptions = {},
  ): Promise<UnixChannelServer> {
    const ch = new UnixChannelServer(socketPath, opts);
    await fsp.mkdir(path.dirname(socketPath), { recursive: true });
    await removeStaleSocket(socketPath);
    const server = net.createServer((sock) => ch.attach(sock));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(socketPath, () => {
        server.off('error', reject);
        resolve();
      });
    });
    server.on('error', (err) => ch.log.error({ err }, 'channel socket error'));
    // Created under the umask (owner-only connect under 022): we only ever widen it after.
    await fsp.chmod(socketPath, opts.mode ?? 0o600);
    ch.server = server;
    return ch;
  }

  async close(): Promise<void> {
    if (this.ended) return;
    this.ended = true;
    this.endSocket();
    const server = this.server;
    this.server = null;
    if (server) await new Promise<void>((resolve) => server.close(() => resolve()));
    await fsp.rm(this.path, { force: true });
  }
}

/**
 * Host side: one connection to a guest's socket (or a QEMU chardev socket). Rejects with
 * TRANSPORT when nothing listens there. For reconnects wrap it in ReconnectingChannel.
 */
export function connectUnix(
  socketPath: string,
  opts: ChannelOptions & { timeoutMs?: number } = {},
): Promise<SocketChannel> {
  const timeoutMs = opts.timeoutMs ?? 5000;
  return new Promise((resolve, reject) => {
    const sock = net.connect(socketPath);
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new NestError('TIMEOUT', `connecting to ${socketPath} took over ${timeoutMs} ms`));
    }, timeoutMs);
    const onError = (err: NodeJS.ErrnoException): void => {
      clearTimeout(timer);
      reject(
        new NestError(
          'TRANSPORT',
          err.code === 'ENOENT' || err.code === 'ECONNREFUSED'
            ? `no guest channel listening on ${socketPath} (${err.code}): is the guest (or its VM) up?`
            : `cannot connect to ${socketPath}: ${err.message}`,
          { cause: err },
        ),
      );
    };
    sock.once('error', onError);
    sock.once('connect', () => {
      clearTimeout(timer);
      sock.off('error', onError);
      resolve(new SocketChannel(sock, opts));
    });
  });
}
