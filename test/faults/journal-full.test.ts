/**
 * A journal write that fails (docs/reliability.md): the guest agent's state directory is a
 * 1 MiB tmpfs, filled to the last byte after the agent has started. A reclaim is then
 * refused with JOURNAL_WRITE (ENOSPC named), rather than carried out without a record: no
 * project gets a signal, no limit changes, the journal holds nothing for it. Once space is
 * freed the same reclaim is accepted and carried out. The tmpfs is unmounted in cleanup.
 */
import { execFileSync } from 'node:child_process';
import { promises as fs, readFileSync } from 'node:fs';
import path from 'node:path';
import { type TestAdapter } from '../helpers/cgroup-root';
import { GuestUnderTest, nestctl, type AgentProc, type Env } from '../integration/guest/harness';

jest.setTimeout(60_000);

let g: GuestUnderTest;
let t: TestAdapter;
let env: Env;
let agent: AgentProc | undefined;

beforeAll(async () => {
  let mounted = false;
  g = await GuestUnderTest.start(
    'jfull',
    [
      { name: 'web', priority: 100, mode: 'graceful', memory: { min: '256MiB', max: '1GiB' } },
      { name: 'a', priority: 1, mode: 'graceful', memory: { min: '512MiB', max: '1GiB' } },
    ],
    {
      // The journal on a 1 MiB tmpfs of its own, so the test can fill it.
      prepare: async (e) => {
        await fs.mkdir(e.stateDir, { recursive: true });
        execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=1m,mode=0700', 'tmpfs', e.stateDir]);
        mounted = true;
      },
      ready: {
        what: 'the projects to run',
        until: (e) => ['web', 'a'].every((p) => e.markerLines(p).length > 0),
      },
      cleanup: (e) => {
        if (!mounted) return;
        try {
          execFileSync('umount', [e.stateDir]);
        } catch {
          execFileSync('umount', ['-l', e.stateDir]); // busy: detach now, freed when unused
        }
      },
    },
  );
  ({ t, env, agent } = g);
});

afterAll(() => g?.dispose());

/** Fills the filesystem at `dir` until the kernel says ENOSPC. */
async function fill(dir: string): Promise<string> {
  const file = path.join(dir, 'filler');
  const fh = await fs.open(file, 'w');
  const chunk = Buffer.alloc(4096, 0xaa);
  try {
    for (;;) await fh.write(chunk);
  } catch (err) {
    expect((err as NodeJS.ErrnoException).code).toBe('ENOSPC');
  } finally {
    await fh.close().catch(() => undefined);
  }
  // Small writes too, until not one more byte fits.
  try {
    for (;;) await fs.appendFile(file, 'x');
  } catch (err) {
    expect((err as NodeJS.ErrnoException).code).toBe('ENOSPC');
  }
  return file;
}

test('a full disk: the reclaim is refused with JOURNAL_WRITE and nothing is done; with space it works', async () => {
  expect(readFileSync('/proc/mounts', 'utf8')).toContain(` ${env.stateDir} tmpfs `);
  const aPids = await t.adapter.pids('guest/projects/a');
  const before = await t.adapter.readLimits('guest/projects/a');
  const filler = await fill(env.stateDir);

  const r = await nestctl(env, ['reclaim', '--memory', '3.5GiB', '--deadline', '10s', '--json']);
  expect(r.code).not.toBe(0);
  const out = r.stdout + r.stderr;
  expect(out).toContain('JOURNAL_WRITE');
  expect(out).toMatch(/ENOSPC|no space left/i);
  // Nothing done: same processes, no SIGTERM handler ran, same limits, no record. (Nor
  // later: the next reclaim below goes through the same one-at-a-time queue, so work of
  // this one would come first, and that one would not find `a` running to stop.)
  expect(await t.adapter.pids('guest/projects/a')).toEqual(aPids);
  expect(env.markerLines('a').filter((l) => l.startsWith('term '))).toEqual([]);
  expect(await t.adapter.readLimits('guest/projects/a')).toEqual(before);
  const records = (await fs.readdir(path.join(env.stateDir, 'notices'))).filter((f) =>
    f.endsWith('.json'),
  );
  expect(records).toEqual([]);
  expect(agent!.child.exitCode).toBeNull(); // the agent is still up

  // Space again: the same reclaim goes through, once (the only SIGTERM `a` ever had).
  await fs.rm(filler);
  const ok = await nestctl(env, ['reclaim', '--memory', '3.5GiB', '--deadline', '10s', '--json']);
  expect(ok.code).toBe(0);
  const res = JSON.parse(ok.stdout) as {
    outcome: { status: string; projects: { name: string; action: string }[] };
  };
  expect(res.outcome.status).toBe('complete');
  expect(res.outcome.projects.find((p) => p.name === 'a')!.action).toBe('stopped');
  expect(env.markerLines('a').filter((l) => l.startsWith('term '))).toHaveLength(1);
});
