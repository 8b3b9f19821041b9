/**
 * The operator API over a real unix socket: what nestctl sees from a daemon.
 */
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import {
  RPC_MAX_CONNECTIONS,
  RPC_MAX_INFLIGHT,
  RPC_MAX_UNREAD_BYTES,
  RpcServer,
  rpcCall,
} from '../../../agent/common/rpc';
import { NestError } from '../../../agent/common/errors';

let dir: string;
let sock: string;
let server: RpcServer;

beforeEach(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nestbroker-rpc-'));
  sock = path.join(dir, 'run', 'host.sock');
  server = new RpcServer();
});

afterEach(async () => {
  await server.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

/** Sends raw bytes and collects reply lines until `n` have arrived. */
function rawExchange(p: string, payload: Buffer | string, n: number): Promise<unknown[]> {
  return new Promise((resolve, reject) => {
    const c = net.connect(p);
    let buf = '';
    c.on('connect', () => c.write(payload));
    c.on('data', (d) => {
      buf += d.toString('utf8');
      const lines = buf.split('\n').filter((l) => l.length > 0);
      if (buf.endsWith('\n') && lines.length >= n) {
        c.destroy();
        resolve(lines.map((l) => JSON.parse(l)));
      }
    });
    c.on('error', reject);
  });
}

test('a command streams its progress lines, then its result', async () => {
  server.handle('reclaim', async (args, ctx) => {
    ctx.progress({ project: 'batch', phase: 'notified' });
    ctx.progress({ project: 'batch', phase: 'stopped' });
    return { guest: args.guest, status: 'complete' };
  });
  await server.listen(sock);
  const seen: unknown[] = [];
  const result = await rpcCall(
    sock,
    'reclaim',
    { guest: 'vm1' },
    { onProgress: (e) => seen.push(e) },
  );
  expect(seen).toEqual([
    { project: 'batch', phase: 'notified' },
    { project: 'batch', phase: 'stopped' },
  ]);
  expect(result).toEqual({ guest: 'vm1', status: 'complete' });
});

test('the progress lines of one turn reach the caller in order, in a write or two, before the result', async () => {
  // A guest's progress arrives a line at a time; the server corks a turn's lines (agent/
  // common/rpc.ts) and sends them in one write(2), not 200: the kernel's count of this
  // process's write system calls (syscw, /proc/<pid>/io, proc(5)) says how many were made.
  const syscw = (): number =>
    Number(/^syscw:\s+(\d+)/m.exec(fs.readFileSync('/proc/self/io', 'utf8'))![1]);
  let during = 0;
  server.handle('reclaim', async (_args, ctx) => {
    const before = syscw();
    for (let i = 0; i < 200; i++) ctx.progress({ i });
    await new Promise((r) => setImmediate(r));
    during = syscw() - before;
    ctx.progress({ i: 200 });
    return 'done';
  });
  await server.listen(sock);
  const seen: unknown[] = [];
  const result = await rpcCall(sock, 'reclaim', {}, { onProgress: (e) => seen.push(e) });
  expect(seen).toEqual(Array.from({ length: 201 }, (_, i) => ({ i })));
  expect(result).toBe('done');
  // One write for the 200 lines (a few more if anything else in this process wrote).
  expect(during).toBeLessThan(20);
});

test('the socket is 0660 and owned by the requested group; the parent directory is created', async () => {
  server.handle('status', async () => 'ok');
  await server.listen(sock, { mode: 0o660, group: 0 });
  const st = fs.statSync(sock);
  expect(st.isSocket()).toBe(true);
  expect(st.mode & 0o777).toBe(0o660);
  expect(st.gid).toBe(0);
  await expect(rpcCall(sock, 'status')).resolves.toBe('ok');
});

test('an unknown command is INPUT_INVALID and names the commands the daemon knows', async () => {
  server.handle('guests', async () => []).handle('status', async () => ({}));
  await server.listen(sock);
  const err = await rpcCall(sock, 'reclam').catch((e: unknown) => e);
  expect(err).toBeInstanceOf(NestError);
  expect((err as NestError).code).toBe('INPUT_INVALID');
  expect((err as NestError).message).toMatch(/"reclam".*guests, status/);
});

test("a handler's NestError keeps its code and problems; any other throw is INTERNAL", async () => {
  server.handle('plan', async () => {
    throw new NestError('GUEST_UNKNOWN', 'no guest "vm9"', {
      problems: [{ field: 'guest', value: 'vm9', message: 'no guest has that name' }],
    });
  });
  server.handle('boom', async () => {
    throw new TypeError('x is undefined');
  });
  await server.listen(sock);
  const e1 = (await rpcCall(sock, 'plan', { guest: 'vm9' }).catch((e) => e)) as NestError;
  expect(e1.code).toBe('GUEST_UNKNOWN');
  expect(e1.problems).toEqual([
    { field: 'guest', value: 'vm9', message: 'no guest has that name' },
  ]);
  const e2 = (await rpcCall(sock, 'boom').catch((e) => e)) as NestError;
  expect(e2.code).toBe('INTERNAL');
  expect(e2.message).toBe('x is undefined');
});

test('no daemon: ENOENT and a stale socket (ECONNREFUSED) are TRANSPORT errors that say what to check', async () => {
  const e1 = (await rpcCall(path.join(dir, 'nothing.sock'), 'status').catch((e) => e)) as NestError;
  expect(e1.code).toBe('TRANSPORT');
  expect(e1.message).toMatch(/no daemon socket at .*nothing\.sock.*running/);

  // A socket file whose daemon died: bound, never listening, never unlinked.
  const stale = path.join(dir, 'stale.sock');
  expect(await makeStaleSocketFile(stale)).toBe(true);
  const e2 = (await rpcCall(stale, 'status').catch((e) => e)) as NestError;
  expect(e2.code).toBe('TRANSPORT');
  expect(e2.message).toMatch(/nothing is listening/);
});

/** A socket file with no listener: bind() without listen() from a child python. */
async function makeStaleSocketFile(p: string): Promise<boolean> {
  const { execFileSync } = await import('node:child_process');
  execFileSync('python3', [
    '-c',
    'import socket,sys; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1])',
    p,
  ]);
  return fs.lstatSync(p).isSocket();
}

test('listen replaces a stale socket file but refuses to steal a live daemon or clobber a regular file', async () => {
  fs.mkdirSync(path.dirname(sock), { recursive: true });
  await makeStaleSocketFile(sock);
  server.handle('status', async () => 'fresh');
  await server.listen(sock);
  await expect(rpcCall(sock, 'status')).resolves.toBe('fresh');

  const second = new RpcServer();
  const err = (await second.listen(sock).catch((e) => e)) as NestError;
  expect(err.code).toBe('CONFIG_INVALID');
  expect(err.message).toMatch(/already listening/);
  await expect(rpcCall(sock, 'status')).resolves.toBe('fresh');

  const file = path.join(dir, 'not-a-socket');
  fs.writeFileSync(file, 'keep me');
  const err2 = (await new RpcServer().listen(file).catch((e) => e)) as NestError;
  expect(err2.message).toMatch(/not a socket/);
  expect(fs.readFileSync(file, 'utf8')).toBe('keep me');
});

test('a slow command times out on the caller with TIMEOUT; the caller going away aborts the handler', async () => {
  let aborted!: () => void;
  const abortSeen = new Promise<void>((r) => (aborted = r));
  server.handle('wait', (_args, ctx) => {
    return new Promise((resolve) => {
      ctx.signal.addEventListener('abort', () => {
        aborted();
        resolve(null);
      });
    });
  });
  await server.listen(sock);
  const err = (await rpcCall(sock, 'wait', {}, { timeoutMs: 100 }).catch((e) => e)) as NestError;
  expect(err.code).toBe('TIMEOUT');
  await abortSeen; // the handler learned its caller is gone
});

test('garbage, a malformed request and an oversized line get error replies; the connection stays', async () => {
  server.handle('ping', async () => 'pong');
  await server.listen(sock);
  const big = 'x'.repeat(70 * 1024);
  const replies = (await rawExchange(
    sock,
    'not json\n{"id":7,"cmd":""}\n' + big + '\n{"id":"a","cmd":"ping"}\n',
    4,
  )) as {
    id: unknown;
    error?: { code: string; message: string; problems?: unknown[] };
    result?: unknown;
  }[];
  expect(replies[0]).toMatchObject({ id: null, error: { code: 'INPUT_INVALID' } });
  expect(replies[1]).toMatchObject({ id: 7, error: { code: 'INPUT_INVALID' } });
  expect(replies[1].error?.problems).toEqual([
    expect.objectContaining({ field: 'cmd', value: '' }),
  ]);
  expect(replies[2]).toMatchObject({ id: null, error: { code: 'PROTOCOL_OVERSIZE' } });
  expect(replies[3]).toEqual({ id: 'a', result: 'pong' });
});

test('several calls at once on one daemon each get their own answer', async () => {
  server.handle('echo', async (args) => {
    await new Promise((r) => setTimeout(r, Number(args.delay)));
    return args.n;
  });
  await server.listen(sock);
  const results = await Promise.all(
    [30, 10, 20, 0].map((delay, n) => rpcCall(sock, 'echo', { n, delay })),
  );
  expect(results).toEqual([0, 1, 2, 3]);
});

test('close removes the socket file', async () => {
  await server.listen(sock);
  expect(fs.existsSync(sock)).toBe(true);
  await server.close();
  expect(fs.existsSync(sock)).toBe(false);
});

describe('one operator connection cannot grow the daemon', () => {
  test(`requests beyond ${RPC_MAX_INFLIGHT} unanswered on one connection are refused with RATE_LIMITED, nothing done`, async () => {
    let started = 0;
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    server.handle('slow', async (args) => {
      started++;
      await gate;
      return { n: args.n };
    });
    await server.listen(sock);
    const N = RPC_MAX_INFLIGHT + 18;
    const c = net.connect(sock);
    await new Promise((r) => c.once('connect', r));
    const replies: { id: number; result?: { n: number }; error?: { code: string } }[] = [];
    let buf = '';
    c.on('data', (d) => {
      buf += d.toString('utf8');
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        replies.push(JSON.parse(buf.slice(0, i)));
        buf = buf.slice(i + 1);
      }
    });
    c.write(
      Array.from({ length: N }, (_, n) => JSON.stringify({ id: n, cmd: 'slow', args: { n } }))
        .map((l) => `${l}\n`)
        .join(''),
    );
    const until = async (pred: () => boolean): Promise<void> => {
      for (let i = 0; i < 200 && !pred(); i++) await new Promise((r) => setTimeout(r, 10));
      expect(pred()).toBe(true);
    };
    // The first 32 are running; the other 18 are refused at once, each by its id.
    await until(() => replies.length === N - RPC_MAX_INFLIGHT);
    expect(started).toBe(RPC_MAX_INFLIGHT);
    expect(replies.map((r) => r.id)).toEqual(
      Array.from({ length: N - RPC_MAX_INFLIGHT }, (_, k) => RPC_MAX_INFLIGHT + k),
    );
    expect(new Set(replies.map((r) => r.error?.code))).toEqual(new Set(['RATE_LIMITED']));
    // Once they are answered, the connection takes requests again.
    release();
    await until(() => replies.length === N);
    expect(replies.slice(N - RPC_MAX_INFLIGHT).map((r) => r.result?.n)).toEqual(
      Array.from({ length: RPC_MAX_INFLIGHT }, (_, k) => k),
    );
    c.write(`${JSON.stringify({ id: 'again', cmd: 'slow', args: { n: 99 } })}\n`);
    await until(() => replies.length === N + 1);
    expect(replies[N]).toEqual({ id: 'again', result: { n: 99 } });
    expect(started).toBe(RPC_MAX_INFLIGHT + 1);
    c.destroy();
  });

  test(`connections beyond ${RPC_MAX_CONNECTIONS} are told why and closed; the others still work`, async () => {
    server.handle('ping', async () => 'pong');
    await server.listen(sock);
    const open: net.Socket[] = [];
    try {
      for (let i = 0; i < RPC_MAX_CONNECTIONS; i++) {
        const c = net.connect(sock);
        await new Promise((r) => c.once('connect', r));
        open.push(c);
      }
      // Let the server see them all.
      await expect(rpcCall(sock, 'ping', {})).rejects.toMatchObject({ code: 'RATE_LIMITED' });
      open.pop()!.destroy();
      // Once the server has seen that one close, there is room for one more.
      const until = Date.now() + 10_000;
      let answer: unknown;
      for (;;) {
        answer = await rpcCall(sock, 'ping', {}).catch((e: unknown) => e);
        if (answer === 'pong' || Date.now() > until) break;
        expect(answer).toMatchObject({ code: 'RATE_LIMITED' }); // refused, not broken
        await new Promise((r) => setTimeout(r, 10));
      }
      expect(answer).toBe('pong');
    } finally {
      for (const c of open) c.destroy();
    }
  });

  test('a caller that never reads its replies is disconnected, not buffered for', async () => {
    const MiB = 1024 * 1024;
    let served = 0;
    server.handle('big', async () => {
      served++;
      return 'x'.repeat(MiB);
    });
    await server.listen(sock);
    const c = net.connect(sock);
    await new Promise((r) => c.once('connect', r));
    c.pause(); // never reads
    const closed = new Promise((r) => c.once('close', r));
    c.on('error', () => undefined);
    // 40 MiB of replies asked for: more than the unread cap plus what the kernel buffers.
    for (let i = 0; i < 40; i++) c.write(`${JSON.stringify({ id: i, cmd: 'big' })}\n`);
    c.resume(); // reading now only to see the close; the server has already given up
    c.on('data', () => undefined);
    await closed;
    expect(served).toBeGreaterThan(RPC_MAX_UNREAD_BYTES / MiB);
    // The daemon is fine: a new connection is answered.
    server.handle('ping', async () => 'pong');
    await expect(rpcCall(sock, 'ping', {})).resolves.toBe('pong');
  });
});
