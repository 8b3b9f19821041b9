/**
 * The demo cleans up after itself (docs/reliability.md): `make demo` killed with -9 once
 * its daemons are up leaves them running only until the next demo on that root starts,
 * whose clean-up kills them through the cgroup (they run in `<root>/daemons`); a demo
 * started while another runs on the same root refuses, naming it, and does not touch the
 * running one, which finishes ok. Afterwards nothing of the root is left in cgroupfs.
 * Real demo processes, a per-run root (never the demo's own).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, promises as fs, readdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { processStart } from '../../../agent/common/state-lock';
import { removeLeftoverRoot } from '../../../demo/stack';
import { ensureBuilt, waitFor } from '../guest/harness';

jest.setTimeout(180_000);

const DEMO = path.resolve(__dirname, '../../../dist/demo/demo.js');
const ROOT = `nestbroker-test-${process.pid}-demokill`;
const started: ChildProcess[] = [];

interface Run {
  child: ChildProcess;
  out(): string;
  exited: Promise<number | null>;
}

function demo(): Run {
  const child = spawn(process.execPath, [DEMO, '--root', ROOT], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  started.push(child);
  let out = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (out += d.toString()));
  const exited = new Promise<number | null>((r) => child.on('exit', (code) => r(code)));
  return { child, out: () => out, exited };
}

/** Alive and still the same process (its start time, against pid reuse). */
const alive = (p: { pid: number; start: number }): boolean => processStart(p.pid) === p.start;

const rootDirs = (): string[] =>
  readdirSync('/sys/fs/cgroup')
    .map((m) => path.join('/sys/fs/cgroup', m, ROOT))
    .filter((d) => existsSync(d));

beforeAll(() => ensureBuilt());

afterAll(async () => {
  for (const c of started) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  await removeLeftoverRoot(ROOT).catch(() => undefined);
  await fs.rm(path.join(os.tmpdir(), `${ROOT}.demo-lock`), { recursive: true, force: true });
});

test('a demo killed with -9: its daemons end at the next start; a concurrent demo refuses; nothing left', async () => {
  const first = demo();
  await waitFor(
    'the daemons of the first demo',
    () => /host broker: pid \d+/.test(first.out()),
    60_000,
  );
  const daemons = [...first.out().matchAll(/(?:guest vm\d|host broker): pid (\d+)/g)].map((m) => {
    const pid = Number(m[1]);
    return { pid, start: processStart(pid)! };
  });
  expect(daemons).toHaveLength(3);
  for (const d of daemons) expect(alive(d)).toBe(true);
  // The daemons run in the demo's own root, where the next run's clean-up reaches them.
  const procs = (await fs.readFile(`/sys/fs/cgroup/unified/${ROOT}/daemons/cgroup.procs`, 'utf8'))
    .split('\n')
    .filter(Boolean)
    .map(Number);
  expect(procs.sort()).toEqual(daemons.map((d) => d.pid).sort());
  first.child.kill('SIGKILL');
  await first.exited;

  const second = demo();
  await waitFor(
    'the second demo to clean up',
    () => /removed a leftover/.test(second.out()),
    60_000,
  );
  await waitFor(
    "the first demo's daemons to be gone",
    () => daemons.every((d) => !alive(d)),
    15_000,
  );

  // A third on the same root while the second runs: refused, naming the second. The
  // second is held (SIGSTOP to our own child, by its pid) so the third meets it running
  // however fast this machine gets through a whole demo (an idle CI machine did, once).
  process.kill(second.child.pid!, 'SIGSTOP');
  try {
    const third = demo();
    expect(await third.exited).toBe(1);
    expect(third.out()).toContain(`held by pid ${second.child.pid}`);
    expect(third.out()).toContain('--root NAME');
  } finally {
    process.kill(second.child.pid!, 'SIGCONT');
  }

  // The second runs to the end, untouched by the third.
  expect(await second.exited).toBe(0);
  const last = JSON.parse(second.out().trim().split('\n').pop()!) as { ok: boolean };
  expect(last.ok).toBe(true);
  expect(rootDirs()).toEqual([]);
});
