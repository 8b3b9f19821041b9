/**
 * The operator API: `nestctl` talks to a daemon (host broker or guest agent) over a unix
 * socket (`/run/nestbroker/host.sock`, 0660: docs/host-broker.md), one JSON value a line
 * with the protocol's framing (agent/protocol/framing.ts).
 *
 *   request   {"id": "...", "cmd": "reclaim", "args": {...}}
 *   replies   {"id": "...", "progress": {...}}*            (streamed while the handler works)
 *             {"id": "...", "result": ...}                  (exactly one of these two ends it)
 *             {"id": "...", "error": {"code", "message", "problems"?, "catalog"?, "errno"?, "file"?}}
 *
 * Several requests may be in flight on one connection; replies carry the request's id.
 * A request that cannot be parsed at all is answered with `"id": null`.
 *
 * An error's `code` is one of the catalog in docs/errors.md: a NestError's code, or, with
 * `"catalog": "cgroup"`, a CgroupError's (with the `errno` and `file` it carried), so a
 * kernel refusal reaches the operator as itself (EBUSY, ENOENT...), not as INTERNAL.
 */
import { promises as fsp } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { randomUUID } from 'node:crypto';
import { z } from 'zod';
import { ErrorCodes, NestError, type ErrorCode, type Problem } from './errors';
import { CgroupError, CgroupErrorCodes, type CgroupErrorCode } from '../../cgroup-adapter/errors';
import { LineDecoder, encode } from '../protocol/framing';
import { MAX_LINE_BYTES } from '../protocol/messages';
import type { Logger } from './log';

/** Requests are capped like protocol lines. */
export const RPC_MAX_REQUEST_BYTES = MAX_LINE_BYTES;
/**
 * Replies may be larger (a `notices` listing of a busy host passes 64 KiB); still a cap,
 * so a confused daemon cannot make nestctl grow without bound.
 */
export const RPC_MAX_REPLY_BYTES = 4 * 1024 * 1024;

/**
 * Bounds on what one operator connection may hold (docs/reliability.md: memory bounded,
 * per-connection limits). The socket is root/group only, but a stuck script or a runaway
 * loop must not grow the daemon: requests beyond RPC_MAX_INFLIGHT unanswered on one
 * connection are refused with RATE_LIMITED (nothing done), connections beyond
 * RPC_MAX_CONNECTIONS are closed at once, and a caller that does not read its replies is
 * disconnected once RPC_MAX_UNREAD_BYTES are queued for it.
 */
export const RPC_MAX_INFLIGHT = 32;
export const RPC_MAX_CONNECTIONS = 64;
export const RPC_MAX_UNREAD_BYTES = 2 * RPC_MAX_REPLY_BYTES;

export interface RpcContext {
  /** Streams one progress line to the caller before the final result. */
  progress(event: unknown): void;
  /** Aborted when the caller disconnects (nestctl interrupted): stop waiting for it. */
  signal: AbortSignal;
}

export type RpcHandler = (args: Record<string, unknown>, ctx: RpcContext) => Promise<unknown>;

export interface RpcErrorBody {
  code: string;
  message: string;
  problems?: Problem[];
  /** `cgroup`: `code` is a CgroupError's (docs/errors.md "CgroupError codes"). */
  catalog?: 'cgroup';
  /** A CgroupError's errno (`EBUSY`...) and the cgroup file involved. */
  errno?: string;
  file?: string;
}

const RequestSchema = z
  .object({
    id: z.union([z.string().min(1).max(128), z.number().int().safe()]),
    cmd: z.string().min(1).max(64),
    args: z.record(z.unknown()).optional(),
  })
  .strict();

export interface ListenOptions {
  /** File mode of the socket: who may connect (connect(2) needs write permission). */
  mode?: number;
  /** Group id to own the socket, so operators in that group may use it. */
  group?: number;
}

export class RpcServer {
  private readonly handlers = new Map<string, RpcHandler>();
  private readonly sockets = new Set<net.Socket>();
  private server: net.Server | null = null;
  private socketPath: string | null = null;

  constructor(private readonly log?: Logger) {}

  handle(cmd: string, fn: RpcHandler): this {
    this.handlers.set(cmd, fn);
    return this;
  }

  get path(): string | null {
    return this.socketPath;
  }

  async listen(socketPath: string, opts: ListenOptions = {}): Promise<void> {
    const mode = opts.mode ?? 0o660;
    await fsp.mkdir(path.dirname(socketPath), { recursive: true, mode: 0o755 });
    await removeStaleSocket(socketPath);
    const server = net.createServer((sock) => this.serve(sock));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(socketPath, () => {
        server.off('error', reject);
        resolve();
      });
    });
    this.server = server;
    this.socketPath = socketPath;
    // The socket is created with the umask's mode (0755 under the usual 022), which lets
    // nobody but the owner connect; we only widen it after, so there is no open window.
    await fsp.chmod(socketPath, mode);
    if (opts.group !== undefined) await fsp.chown(socketPath, process.getuid?.() ?? 0, opts.group);
    server.on('error', (err) => this.log?.error({ err }, 'operator socket error'));
  }

  async close(): Promise<void> {
    const server = this.server;
    this.server = null;
    for (const s of this.sockets) s.destroy();
    if (server) await new Promise<void>((resolve) => server.close(() => resolve()));
    if (this.socketPath) await fsp.rm(this.socketPath, { force: true });
  }

  private serve(sock: net.Socket): void {
    if (this.sockets.size >= RPC_MAX_CONNECTIONS) {
      this.log?.warn({ max: RPC_MAX_CONNECTIONS }, 'operator connection refused: too many open');
      sock.end(
        encode({
          id: null,
          error: {
            code: 'RATE_LIMITED',
            message: `${this.sockets.size} operator connections are open (cap ${RPC_MAX_CONNECTIONS}); closed`,
          },
        }),
        // Flushed, then gone: nothing reads this socket, so it would never see the EOF.
        () => sock.destroy(),
      );
      sock.on('error', () => undefined);
      return;
    }
    this.sockets.add(sock);
    const decoder = new LineDecoder(RPC_MAX_REQUEST_BYTES);
    const abort = new AbortController();
    let inflight = 0;
    // The progress lines of one turn of the event loop go out in one write: corked until
    // setImmediate, after every socket read of the turn (a notice's progress arrives from
    // its guest a line at a time, and a write per line costs a system call and a wake-up
    // of the reader each: docs/performance.md, "Third round"). A final reply is not held:
    // it flushes what is corked before it, in order.
    let corked = false;
    const flush = (): void => {
      if (!corked) return;
      corked = false;
      sock.uncork();
    };
    const send = (reply: object): void => {
      if (sock.destroyed || !sock.writable) return;
      let line: Buffer;
      try {
        line = encode(reply, RPC_MAX_REPLY_BYTES);
      } catch (err) {
        const id = (reply as { id?: unknown }).id ?? null;
        line = encode({ id, error: { code: 'INTERNAL', message: errorMessage(err) } });
      }
      if (sock.writableLength + line.length > RPC_MAX_UNREAD_BYTES) {
        this.log?.warn(
          { unread: sock.writableLength, max: RPC_MAX_UNREAD_BYTES },
          'operator connection closed: it does not read its replies',
        );
        sock.destroy();
        return;
      }
      const progress = 'progress' in reply;
      if (progress && !corked) {
        corked = true;
        sock.cork();
        setImmediate(flush);
      }
      sock.write(line);
      if (!progress) flush();
    };
    sock.on('data', (chunk: Buffer) => {
      for (const ev of decoder.push(chunk)) {
        if (ev.kind === 'line') {
          if (inflight >= RPC_MAX_INFLIGHT) {
            send({
              id: idOfLine(ev.line),
              error: {
                code: 'RATE_LIMITED',
                message: `${inflight} requests on this connection are unanswered (cap ${RPC_MAX_INFLIGHT}); refused, nothing done`,
              },
            });
            continue;
          }
          inflight++;
          this.dispatch(ev.line, send, abort.signal, () => inflight--);
        } else if (ev.kind === 'oversize')
          send({
            id: null,
            error: {
              code: 'PROTOCOL_OVERSIZE',
              message: `request line of ${ev.bytes} bytes is over the ${ev.limit}-byte cap`,
            },
          });
        else if (ev.kind === 'invalid-utf8')
          send({
            id: null,
            error: { code: 'INPUT_INVALID', message: `request line is not valid UTF-8` },
          });
      }
    });
    sock.on('error', () => undefined); // the peer went away; 'close' follows
    sock.on('close', () => {
      this.sockets.delete(sock);
      abort.abort();
    });
  }

  private dispatch(
    line: string,
    reply: (reply: object) => void,
    signal: AbortSignal,
    finished: () => void,
  ): void {
    // Every request ends with exactly one final reply (result or error): that frees its slot.
    const send = (r: object): void => {
      if (!('progress' in r)) finished();
      reply(r);
    };
    let raw: unknown;
    try {
      raw = JSON.parse(line);
    } catch (err) {
      send({
        id: null,
        error: { code: 'INPUT_INVALID', message: `request is not JSON: ${errorMessage(err)}` },
      });
      return;
    }
    const parsed = RequestSchema.safeParse(raw);
    if (!parsed.success) {
      const id = idOf(raw);
      const problems = parsed.error.issues.map((i) => ({
        field: i.path.join('.') || '(request)',
        value: valueAt(raw, i.path),
        message: i.message,
      }));
      send({
        id,
        error: {
          code: 'INPUT_INVALID',
          message: `request must be {id, cmd, args?}: ${problems.map((p) => `${p.field}: ${p.message}`).join('; ')}`,
          problems,
        },
      });
      return;
    }
    const { id, cmd, args = {} } = parsed.data;
    const handler = this.handlers.get(cmd);
    if (!handler) {
      const known = [...this.handlers.keys()].sort().join(', ');
      send({
        id,
        error: {
          code: 'INPUT_INVALID',
          message: `unknown command ${JSON.stringify(cmd)}; this daemon knows: ${known || '(none)'}`,
          problems: [{ field: 'cmd', value: cmd, message: 'unknown command' }],
        },
      });
      return;
    }
    let done = false;
    const ctx: RpcContext = {
      progress: (event) => {
        if (!done) send({ id, progress: event });
      },
      signal,
    };
    Promise.resolve()
      .then(() => handler(args, ctx))
      .then(
        (result) => {
          done = true;
          send({ id, result: result === undefined ? null : result });
        },
        (err: unknown) => {
          done = true;
          if (err instanceof NestError) {
            send({ id, error: errorBody(err) });
          } else if (err instanceof CgroupError) {
            // The kernel or the cgroup layer refused: the operator sees that code; the log
            // keeps the whole error (file, data written, errno, cause).
            this.log?.error({ err, cmd }, 'operator command failed in the cgroup layer');
            send({ id, error: cgroupErrorBody(err) });
          } else {
            this.log?.error({ err, cmd }, 'operator command failed unexpectedly');
            send({ id, error: { code: 'INTERNAL', message: errorMessage(err) } });
          }
        },
      );
  }
}

/** The id of a request line, for a refusal sent before the line is parsed in full. */
function idOfLine(line: string): unknown {
  try {
    return idOf(JSON.parse(line));
  } catch {
    return null;
  }
}

function errorBody(err: NestError): RpcErrorBody {
  const body: RpcErrorBody = { code: err.code, message: err.message };
  if (err.problems.length > 0) body.problems = err.problems;
  return body;
}

function cgroupErrorBody(err: CgroupError): RpcErrorBody {
  const body: RpcErrorBody = { code: err.code, message: err.message, catalog: 'cgroup' };
  if (err.problems.length > 0) body.problems = err.problems;
  if (err.errno !== undefined) body.errno = err.errno;
  if (err.file !== undefined) body.file = err.file;
  return body;
}

/**
 * Removes a socket file left by a daemon that died, but never a live daemon's socket
 * (a second daemon would silently steal its operators) and never a non-socket file.
 */
export async function removeStaleSocket(socketPath: string): Promise<void> {
  let st;
  try {
    st = await fsp.lstat(socketPath);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw err;
  }
  if (!st.isSocket()) {
    throw new NestError(
      'CONFIG_INVALID',
      `${socketPath} exists and is not a socket; refusing to replace it`,
    );
  }
  const alive = await new Promise<boolean>((resolve) => {
    const probe = net.connect(socketPath);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
  if (alive) {
    throw new NestError('CONFIG_INVALID', `another daemon is already listening on ${socketPath}`);
  }
  await fsp.rm(socketPath, { force: true });
}

export interface CallOptions {
  onProgress?: (event: unknown) => void;
  /** Rejects with TIMEOUT after this long; 0 waits for ever. Default 30 s. */
  timeoutMs?: number;
}

/**
 * One request, its progress lines, its result. Rejects with a NestError carrying the remote
 * code, or the CgroupError the daemon's cgroup layer raised (`catalog: "cgroup"`).
 */
export function rpcCall(
  socketPath: string,
  cmd: string,
  args: Record<string, unknown> = {},
  opts: CallOptions = {},
): Promise<unknown> {
  const id = randomUUID();
  const timeoutMs = opts.timeoutMs ?? 30_000;
  return new Promise<unknown>((resolve, reject) => {
    const sock = net.connect(socketPath);
    const decoder = new LineDecoder(RPC_MAX_REPLY_BYTES);
    let settled = false;
    let timer: NodeJS.Timeout | undefined;
    const finish = (err: NestError | CgroupError | null, result?: unknown): void => {
      if (settled) return;
      settled = true;
      if (timer) clearTimeout(timer);
      sock.destroy();
      if (err) reject(err);
      else resolve(result);
    };
    if (timeoutMs > 0) {
      timer = setTimeout(
        () =>
          finish(
            new NestError(
              'TIMEOUT',
              `${cmd} on ${socketPath} did not answer within ${timeoutMs} ms`,
            ),
          ),
        timeoutMs,
      );
    }
    sock.once('connect', () => {
      try {
        sock.write(encode({ id, cmd, args }, RPC_MAX_REQUEST_BYTES));
      } catch (err) {
        finish(err instanceof NestError ? err : new NestError('INPUT_INVALID', errorMessage(err)));
      }
    });
    sock.on('data', (chunk: Buffer) => {
      for (const ev of decoder.push(chunk)) {
        if (ev.kind !== 'line') {
          finish(new NestError('TRANSPORT', `unreadable reply from ${socketPath} (${ev.kind})`));
          return;
        }
        let reply: { id?: unknown; progress?: unknown; result?: unknown; error?: unknown };
        try {
          reply = JSON.parse(ev.line);
        } catch {
          finish(new NestError('TRANSPORT', `reply from ${socketPath} is not JSON`));
          return;
        }
        if (reply === null || typeof reply !== 'object') continue;
        if (reply.id !== id && reply.id !== null) continue;
        if (reply.error !== undefined) finish(remoteError(reply.error));
        else if ('result' in reply) finish(null, reply.result);
        else if ('progress' in reply) opts.onProgress?.(reply.progress);
      }
    });
    sock.on('error', (err: NodeJS.ErrnoException) => finish(connectError(socketPath, err)));
    sock.on('close', () =>
      finish(
        new NestError('TRANSPORT', `${socketPath} closed the connection before answering ${cmd}`),
      ),
    );
  });
}

/** A reply's error as the error it was in the daemon: a NestError, or a CgroupError. */
export function remoteError(body: unknown): NestError | CgroupError {
  const b = (body ?? {}) as Partial<RpcErrorBody>;
  const message = typeof b.message === 'string' ? b.message : 'remote error without a message';
  const problems = Array.isArray(b.problems) ? b.problems : [];
  if (b.catalog === 'cgroup' && typeof b.code === 'string' && b.code in CgroupErrorCodes)
    return new CgroupError(b.code as CgroupErrorCode, message, {
      problems,
      errno: typeof b.errno === 'string' ? b.errno : undefined,
      file: typeof b.file === 'string' ? b.file : undefined,
    });
  if (typeof b.code === 'string' && b.code in ErrorCodes) {
    return new NestError(b.code as ErrorCode, message, { problems });
  }
  return new NestError('INTERNAL', `remote error ${String(b.code)}: ${message}`, { problems });
}

function connectError(socketPath: string, err: NodeJS.ErrnoException): NestError {
  switch (err.code) {
    case 'ENOENT':
      return new NestError(
        'TRANSPORT',
        `no daemon socket at ${socketPath} (is the nestbroker service running? check --socket)`,
        { cause: err },
      );
    case 'ECONNREFUSED':
      return new NestError(
        'TRANSPORT',
        `nothing is listening on ${socketPath} (a stale socket: is the nestbroker service running?)`,
        { cause: err },
      );
    case 'EACCES':
    case 'EPERM':
      return new NestError(
        'UNAUTHORIZED',
        `permission denied on ${socketPath} (run as root or as a member of the socket's group)`,
        { cause: err },
      );
    default:
      return new NestError('TRANSPORT', `${socketPath}: ${err.message}`, { cause: err });
  }
}

function idOf(raw: unknown): string | number | null {
  if (raw !== null && typeof raw === 'object' && 'id' in raw) {
    const id = (raw as { id: unknown }).id;
    if ((typeof id === 'string' && id.length <= 128) || Number.isSafeInteger(id)) {
      return id as string | number;
    }
  }
  return null;
}

function valueAt(raw: unknown, p: (string | number)[]): unknown {
  let v: unknown = raw;
  for (const k of p) {
    if (v === null || typeof v !== 'object') return undefined;
    v = (v as Record<string | number, unknown>)[k];
  }
  return v;
}

function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
