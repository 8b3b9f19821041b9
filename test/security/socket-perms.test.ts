/**
 * Who may talk to the daemons (docs/reliability.md, "Nobody gets in"): the
 * operator socket is 0660 root:<group>, so a REAL unprivileged user is refused by the
 * kernel at connect(2) (EACCES, which nestctl reports as UNAUTHORIZED), while a real
 * member of the configured group gets answers. The host↔guest channel socket is 0600:
 * only root. Users and the group are created for this run (useradd/groupadd) and removed
 * afterwards; the clients run as those users through runuser, which sets the supplementary
 * groups from /etc/group as a login would.
 *
 * mTLS refusals (plaintext, no certificate, another CA, expired) are proven in
 * test/integration/transport/tls.test.ts.
 */
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { RpcServer } from '../../agent/common/rpc';
import { UnixChannelServer } from '../../agent/transport/unix';
import { ensureBuilt, REPO } from '../integration/guest/harness';

const tag = `${process.pid % 100000}`;
const GROUP = `nbop${tag}`;
const MEMBER = `nbmem${tag}`;
const OUTSIDER = `nbout${tag}`;

let dir: string;
let server: RpcServer;
let gid: number;

function sh(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.status !== 0)
    throw new Error(`${cmd} ${args.join(' ')} failed (${r.status}): ${r.stderr || r.error}`);
  return r.stdout.trim();
}

/**
 * Runs a node script as `user` (runuser: supplementary groups from /etc/group, as a login).
 * Asynchronous: the server under test lives in this process and must keep answering.
 */
function nodeAs(user: string, script: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const c = spawn('runuser', ['-u', user, '--', process.execPath, '-e', script], {
      cwd: '/',
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    let err = '';
    c.stdout.on('data', (d: Buffer) => (out += d.toString()));
    c.stderr.on('data', (d: Buffer) => (err += d.toString()));
    const t = setTimeout(() => c.kill('SIGKILL'), 20_000);
    c.on('exit', (code) => {
      clearTimeout(t);
      if (code === 0) resolve(out.trim());
      else reject(new Error(`runuser as ${user} exited ${code}: ${err}`));
    });
  });
}

/** Calls `status` on the socket as `user`, with nestctl's client code; returns its outcome. */
async function callAs(
  user: string,
  socket: string,
): Promise<{ ok: boolean; code?: string; errno?: string }> {
  const script = `
    require(${JSON.stringify(path.join(REPO, 'dist/agent/common/rpc.js'))})
      .rpcCall(${JSON.stringify(socket)}, 'status', {}, { timeoutMs: 5000 })
      .then((r) => console.log(JSON.stringify({ ok: true, result: r })),
            (e) => console.log(JSON.stringify({ ok: false, code: e.code, errno: e.cause && e.cause.code })));`;
  return JSON.parse(await nodeAs(user, script));
}

/** A raw connect(2) as `user`: the errno, or 'connected'. */
function connectAs(user: string, socket: string): Promise<string> {
  return nodeAs(
    user,
    `const c = require('net').connect(${JSON.stringify(socket)});
     c.on('connect', () => { console.log('connected'); c.destroy(); });
     c.on('error', (e) => console.log(e.code));`,
  );
}

beforeAll(async () => {
  if (process.getuid?.() !== 0)
    throw new Error('socket permission tests need root (they create users); run as root');
  ensureBuilt();
  sh('groupadd', ['--system', GROUP]);
  gid = Number(sh('getent', ['group', GROUP]).split(':')[2]);
  for (const [u, groups] of [
    [MEMBER, [GROUP]],
    [OUTSIDER, []],
  ] as const)
    sh('useradd', [
      '--system',
      '--no-create-home',
      '--shell',
      '/usr/sbin/nologin',
      ...(groups.length ? ['-G', groups.join(',')] : []),
      u,
    ]);
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nb-perms-'));
  // The directory is searchable by all: what decides is the socket's own mode and group.
  fs.chmodSync(dir, 0o755);
  server = new RpcServer();
  server.handle('status', async () => 'ok');
  await server.listen(path.join(dir, 'run', 'host.sock'), { mode: 0o660, group: gid });
});

afterAll(async () => {
  await server?.close();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
  for (const u of [MEMBER, OUTSIDER]) spawnSync('userdel', [u]);
  spawnSync('groupdel', [GROUP]);
});

test('the operator socket is 0660, owned by root and the configured group', () => {
  const st = fs.statSync(server.path!);
  expect(st.isSocket()).toBe(true);
  expect(st.mode & 0o777).toBe(0o660);
  expect(st.uid).toBe(0);
  expect(st.gid).toBe(gid);
  expect(fs.statSync(path.dirname(server.path!)).mode & 0o777).toBe(0o755);
});

test('a real unprivileged user is refused by the kernel (EACCES), reported as UNAUTHORIZED', async () => {
  expect(await connectAs(OUTSIDER, server.path!)).toBe('EACCES');
  expect(await connectAs('nobody', server.path!)).toBe('EACCES');
  expect(await callAs(OUTSIDER, server.path!)).toEqual({
    ok: false,
    code: 'UNAUTHORIZED',
    errno: 'EACCES',
  });
});

test('a real member of the configured group is let in and answered', async () => {
  expect(sh('id', ['-nG', MEMBER]).split(' ')).toContain(GROUP);
  expect(await callAs(MEMBER, server.path!)).toMatchObject({ ok: true });
});

test('control: the refusal is the socket mode alone (opened to all, the outsider gets in; closed again, refused)', async () => {
  fs.chmodSync(server.path!, 0o666);
  try {
    expect(await connectAs(OUTSIDER, server.path!)).toBe('connected');
  } finally {
    fs.chmodSync(server.path!, 0o660);
  }
  expect(await connectAs(OUTSIDER, server.path!)).toBe('EACCES');
});

test('the host↔guest channel socket is 0600: even a member of the operator group is refused', async () => {
  const ch = await UnixChannelServer.listen(path.join(dir, 'channel.sock'));
  try {
    expect(fs.statSync(ch.path).mode & 0o777).toBe(0o600);
    expect(await connectAs(MEMBER, ch.path)).toBe('EACCES');
    expect(await connectAs('nobody', ch.path)).toBe('EACCES');
  } finally {
    await ch.close();
  }
});
