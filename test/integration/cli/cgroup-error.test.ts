/**
 * A CgroupError that escapes an operator command reaches the caller as itself: its own
 * code (ENOENT, LIMIT_INVALID...), its errno, file and problems, over the operator socket
 * (agent/common/rpc.ts) and out of the real nestctl binary (text and --json), never as
 * INTERNAL (docs/errors.md "CgroupError codes"). The errors come from a real cgroup
 * adapter under this run's own cgroup root (test/helpers/cgroup-root.ts).
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { RpcServer, rpcCall } from '../../../agent/common/rpc';
import { NestError } from '../../../agent/common/errors';
import { CgroupError } from '../../../cgroup-adapter/errors';
import { validateLimits } from '../../../cgroup-adapter/limits';
import { openTestAdapter, type TestAdapter } from '../../helpers/cgroup-root';
import { ensureBuilt, NESTCTL } from '../guest/harness';

jest.setTimeout(120_000);

let t: TestAdapter;
let dir: string;
let sock: string;
let server: RpcServer;

beforeAll(async () => {
  ensureBuilt();
  t = await openTestAdapter('rpc-cgerr');
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nestbroker-cgerr-'));
  sock = path.join(dir, 'guest.sock');
  server = new RpcServer();
  // A daemon's handlers as they are: they call the adapter and let its errors go.
  server.handle('status', async () => t.adapter.usage('no-such-group'));
  server.handle('projects', async () => {
    validateLimits({ memory: { max: -1, high: 'lots' as unknown as number } });
    return [];
  });
  await server.listen(sock);
});

afterAll(async () => {
  await server?.close();
  await t?.dispose();
  fs.rmSync(dir, { recursive: true, force: true });
});

function nestctl(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const c = spawn(process.execPath, [NESTCTL, '--guest', '--socket', sock, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    c.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    c.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    c.on('error', reject);
    c.on('exit', (code) => resolve({ code, stdout, stderr }));
  });
}

test('over the operator socket: the CgroupError arrives with its code, errno, file and problems', async () => {
  const missing = await rpcCall(sock, 'status').catch((e: unknown) => e);
  expect(missing).toBeInstanceOf(CgroupError);
  expect(missing).not.toBeInstanceOf(NestError);
  const m = missing as CgroupError;
  expect(m.code).toBe('ENOENT');
  expect(m.errno).toBe('ENOENT');
  // The file the kernel refused, below this run's root: the operator can look at it.
  expect(m.file).toContain(`${t.rootName}/no-such-group`);
  expect(fs.existsSync(path.dirname(m.file!))).toBe(false);

  const invalid = (await rpcCall(sock, 'projects').catch((e: unknown) => e)) as CgroupError;
  expect(invalid).toBeInstanceOf(CgroupError);
  expect(invalid.code).toBe('LIMIT_INVALID');
  expect(invalid.problems.map((p) => [p.field, p.value])).toEqual([
    ['limits.memory.high', 'lots'],
    ['limits.memory.max', -1],
  ]);
});

test('out of the real nestctl: "error (ENOENT)" and exit 1, the same code in --json', async () => {
  const r = await nestctl(['status']);
  expect(r.code).toBe(1);
  expect(r.stdout).toBe('');
  expect(r.stderr).toMatch(/^error \(ENOENT\): .*no-such-group.*\n$/);
  expect(r.stderr).not.toContain('INTERNAL');

  const j = await nestctl(['status', '--json']);
  expect(j.code).toBe(1);
  expect(JSON.parse(j.stdout)).toEqual({
    error: {
      code: 'ENOENT',
      catalog: 'cgroup',
      errno: 'ENOENT',
      file: expect.stringContaining('no-such-group'),
      message: expect.stringContaining('no-such-group'),
      problems: [],
    },
  });

  const p = await nestctl(['projects']);
  expect(p.code).toBe(1);
  const lines = p.stderr.trimEnd().split('\n');
  expect(lines[0]).toBe('error (LIMIT_INVALID): 2 problems:');
  expect(lines.slice(1).map((l) => l.split(':')[0].trim())).toEqual([
    'limits.memory.high',
    'limits.memory.max',
  ]);
});
