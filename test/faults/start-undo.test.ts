/**
 * Nothing half-made (docs/reliability.md): a guest agent whose start-up fails part-way
 * undoes every step it took. The real `nestbroker guest`, started inside a private mount
 * namespace (unshare(1) --mount --propagation private) in which one, or every, cgroup
 * hierarchy is remounted read-only: the system's hierarchies stay writable, only the
 * agent's view is read-only (mount(8) "remount,ro,bind" changes that one mount's flags).
 * Afterwards no directory of the agent's root exists in any hierarchy, the state and run
 * directories it would have made do not exist, nor its socket, and the error names the
 * kernel's errno (EROFS) and the file.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import * as path from 'node:path';
import { openTestAdapter, type TestAdapter } from '../helpers/cgroup-root';
import {
  NESTBROKER,
  ensureBuilt,
  makeEnv,
  writeConfig,
  type Env,
} from '../integration/guest/harness';
import { promises as fsp } from 'node:fs';

jest.setTimeout(60_000);

let t: TestAdapter;
let env: Env;

beforeAll(async () => {
  ensureBuilt();
  t = await openTestAdapter('start-undo');
});

afterAll(async () => {
  await t?.dispose();
  if (env) await fsp.rm(env.dir, { recursive: true, force: true });
});

beforeEach(async () => {
  if (env) await fsp.rm(env.dir, { recursive: true, force: true });
  env = await makeEnv();
  await writeConfig(env, `${t.rootName}/guest`, [{ name: 'web', priority: 10, mode: 'graceful' }]);
});

/** The agent's root in every hierarchy (below the test's per-run root). */
const agentRoots = (): string[] => t.driver.hierarchies.map((h) => path.join(h.rootAbs, 'guest'));

/** Runs the agent with these mounts (hierarchy mount points) read-only in its namespace. */
function runReadOnly(mounts: string[]): Promise<{ code: number | null; out: string; err: string }> {
  const script =
    'for m in "$@"; do mount -o remount,ro,bind "$m" || exit 99; done; ' +
    `exec "${process.execPath}" "${NESTBROKER}" guest --config "${env.configFile}"`;
  return new Promise((resolve) => {
    const c = spawn(
      'unshare',
      ['--mount', '--propagation', 'private', 'sh', '-c', script, 'sh', ...mounts],
      {
        stdio: ['ignore', 'pipe', 'pipe'],
        env: { ...process.env, NESTBROKER_LOG_LEVEL: 'debug' },
      },
    );
    let out = '';
    let err = '';
    c.stdout.on('data', (d: Buffer) => (out += d.toString()));
    c.stderr.on('data', (d: Buffer) => (err += d.toString()));
    c.on('exit', (code) => resolve({ code, out, err }));
  });
}

function expectNothingLeft(): void {
  for (const dir of agentRoots()) expect([dir, existsSync(dir)]).toEqual([dir, false]);
  expect(existsSync(env.stateDir)).toBe(false);
  expect(existsSync(env.runDir)).toBe(false);
  expect(existsSync(env.socket)).toBe(false);
  expect(existsSync(env.projectSocket)).toBe(false);
}

test('one hierarchy read-only: exit 1, the roots made in the others removed, no state/run dir, EROFS and the file named', async () => {
  const hs = t.driver.hierarchies;
  // The last hierarchy the adapter creates in: every other one has its root made first.
  const last = hs[hs.length - 1];
  const r = await runReadOnly([path.dirname(last.rootAbs)]);
  expect(r.code).toBe(1);
  expect(r.err).toContain('EROFS');
  expect(r.err).toContain(path.join(last.rootAbs, 'guest'));
  // The undo ran for every other hierarchy (the roots were made, then removed).
  for (const h of hs.slice(0, -1))
    expect(r.out).toContain(
      `"dir":"${path.join(h.rootAbs, 'guest')}","msg":"undoing a failed start: removed`,
    );
  expectNothingLeft();
});

test('every hierarchy read-only: exit 1 with EROFS (not ENOENT) and the file; nothing left', async () => {
  const mounts = [...new Set(t.driver.hierarchies.map((h) => path.dirname(h.rootAbs)))];
  const r = await runReadOnly(mounts);
  expect(r.code).toBe(1);
  expect(r.err).toContain('EROFS');
  expect(r.err).not.toContain('ENOENT');
  expect(r.err).toContain(path.join(t.driver.hierarchies[0].rootAbs, 'guest'));
  expectNothingLeft();
});
