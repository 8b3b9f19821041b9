/**
 * The host↔guest channel over TCP with mutual TLS, for guests reached over a network
 * (docs/host-broker.md). No plaintext TCP exists anywhere in nestbroker: this is the only
 * TCP path.
 *
 * The guest listens and requires a client certificate signed by the configured CA
 * (requestCert + rejectUnauthorized); the host checks the guest's certificate against
 * its CA and the guest's name (servername). TLS 1.2 is the floor.
 *
 * Under TLS 1.3 the server checks the client's certificate after the client has already
 * seen its handshake finish, so a refused client only learns of it from an alert a
 * moment later. connectTls therefore waits for the guest channel's first byte (every
 * channel starts a connection with 0xFF, see channel.ts) before it calls the channel
 * open: a refused host gets a rejected promise, never an open channel that dies.
 */
import tls from 'node:tls';
import type { AddressInfo } from 'node:net';
import { NestError } from '../common/errors';
import { SocketBackedChannel, SocketChannel, type ChannelOptions } from './channel';

type Pem = string | Buffer;

export interface TlsServerOptions extends ChannelOptions {
  host?: string;
  port: number;
  cert: Pem;
  key: Pem;
  /** The CA that signs host (client) certificates. */
  ca: Pem;
  /** When set, the client certificate's subject CN must be one of these. */
  allowedClients?: string[];
  handshakeTimeoutMs?: number;
}

/** Guest side: one authenticated host connection at a time, a new one replaces the old. */
export class TlsChannelServer extends SocketBackedChannel {
  private server: tls.Server | null = null;
  /** Handshakes refused (plaintext, no certificate, wrong CA, expired...), for status and tests. */
  refused = 0;
  /** Why the last handshake was refused (OpenSSL's reason), for status and tests. */
  lastRefusal: { code: string; message: string } | null = null;

  private constructor(opts: ChannelOptions) {
    super(opts);
  }

  static async listen(opts: TlsServerOptions): Promise<TlsChannelServer> {
    const ch = new TlsChannelServer(opts);
    const server = tls.createServer(
      {
        cert: opts.cert,
        key: opts.key,
        ca: opts.ca,
        requestCert: true,
        rejectUnauthorized: true,
        minVersion: 'TLSv1.2',
        handshakeTimeout: opts.handshakeTimeoutMs ?? 10_000,
      },
      (sock) => {
        const cn = peerCommonName(sock);
        if (opts.allowedClients && !opts.allowedClients.includes(cn ?? '')) {
          ch.refused++;
          ch.lastRefusal = {
            code: 'NOT_ALLOWED',
            message: `client ${cn} is not in allowedClients`,
          };
          ch.log.warn(
            { cn, remote: sock.remoteAddress },
            'client certificate not in allowedClients',
          );
          sock.destroy();
          return;
        }
        ch.log.info({ cn, remote: sock.remoteAddress }, 'host connected over mutual TLS');
        ch.attach(sock);
      },
    );
    server.on('tlsClientError', (err: NodeJS.ErrnoException, sock) => {
      ch.refused++;
      // Node checks the client certificate after OpenSSL's handshake and then destroys the
      // socket, so the reason is in authorizationError, not in `err` ("socket hang up").
      const why = sock.authorizationError;
      ch.lastRefusal = why
        ? { code: String(why), message: `client certificate refused: ${String(why)}` }
        : { code: err.code ?? 'UNKNOWN', message: err.message };
      ch.log.warn(
        { code: ch.lastRefusal.code, remote: sock.remoteAddress },
        `TLS handshake refused: ${ch.lastRefusal.message}`,
      );
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(opts.port, opts.host ?? '127.0.0.1', () => {
        server.off('error', reject);
        resolve();
      });
    });
    server.on('error', (err) => ch.log.error({ err }, 'TLS channel server error'));
    ch.server = server;
    return ch;
  }

  address(): AddressInfo {
    return this.server?.address() as AddressInfo;
  }

  async close(): Promise<void> {
    if (this.ended) return;
    this.ended = true;
    this.endSocket();
    const server = this.server;
    this.server = null;
    if (server) await new Promise<void>((resolve) => server.close(() => resolve()));
  }
}

export interface TlsConnectOptions extends ChannelOptions {
  host: string;
  port: number;
  cert: Pem;
  key: Pem;
  /** The CA that signs guest (server) certificates. */
  ca: Pem;
  /** The name the guest's certificate must carry (SNI and identity check). */
  servername?: string;
  timeoutMs?: number;
}

/** Host side: one authenticated connection to a guest. */
export function connectTls(opts: TlsConnectOptions): Promise<SocketChannel> {
  const timeoutMs = opts.timeoutMs ?? 5000;
  const where = `${opts.host}:${opts.port}`;
  return new Promise((resolve, reject) => {
    const sock = tls.connect({
      host: opts.host,
      port: opts.port,
      cert: opts.cert,
      key: opts.key,
      ca: opts.ca,
      servername: opts.servername,
      rejectUnauthorized: true,
      minVersion: 'TLSv1.2',
    });
    let settled = false;
    const fail = (err: NestError): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      sock.destroy();
      reject(err);
    };
    const timer = setTimeout(
      () => fail(new NestError('TIMEOUT', `TLS connection to ${where} took over ${timeoutMs} ms`)),
      timeoutMs,
    );
    sock.once('error', (err: NodeJS.ErrnoException) => fail(tlsError(where, err)));
    sock.once('close', () =>
      fail(
        new NestError(
          'UNAUTHORIZED',
          `${where} closed the connection during the handshake (does it accept this host's certificate?)`,
        ),
      ),
    );
    sock.once('secureConnect', () => {
      // Wait for the guest's first byte: only then has it accepted our certificate.
      sock.once('data', (first: Buffer) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        sock.removeAllListeners('error');
        sock.removeAllListeners('close');
        resolve(new SocketChannel(sock, { ...opts, firstChunk: first }));
      });
    });
  });
}

/** Certificate problems are UNAUTHORIZED (do not retry blindly); the rest is TRANSPORT. */
function tlsError(where: string, err: NodeJS.ErrnoException): NestError {
  const code = err.code ?? '';
  const auth =
    /CERT|SELF_SIGNED|UNABLE_TO_VERIFY|ALTNAME|ALERT|HANDSHAKE|CERTIFICATE/.test(code) ||
    code.startsWith('ERR_SSL');
  if (auth) {
    return new NestError('UNAUTHORIZED', `TLS to ${where} refused: ${err.message} (${code})`, {
      cause: err,
    });
  }
  return new NestError('TRANSPORT', `cannot connect to ${where}: ${err.message}`, { cause: err });
}

function peerCommonName(sock: tls.TLSSocket): string | undefined {
  const cn = sock.getPeerCertificate()?.subject?.CN;
  return Array.isArray(cn) ? cn[0] : cn;
}
