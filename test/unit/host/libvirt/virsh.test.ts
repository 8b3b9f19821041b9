/**
 * The virsh wrapper's execFile runner against a stand-in program (a script in a temp
 * directory, run by execFile like virsh): arguments arrive as one array, never through a
 * shell; stderr is kept in the error; libvirt's "failed to get domain" is DOMAIN_UNKNOWN;
 * a missing program is PREREQUISITE_MISSING; a call past its timeout is killed.
 */
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  Virsh,
  execVirsh,
  parseDommemstat,
  parseDomstatsVcpu,
  parseSchedinfo,
} from '../../../../agent/host/libvirt/virsh';
import { fixture } from './fake-virsh';
import { failure } from '../../../helpers/failure';

let dir: string;
let bin: string;
beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-virsh-'));
  bin = path.join(dir, 'virsh');
  // Prints each argument on its own line; fails like virsh for a domain named "nosuch".
  await fs.writeFile(
    bin,
    `#!/bin/sh
for a in "$@"; do printf '%s\\n' "$a"; done
case "$*" in
  *nosuch*) echo "error: failed to get domain 'nosuch'" >&2; exit 1 ;;
  *broken*) echo "error: internal error: unable to execute QEMU command 'device_del'" >&2; exit 1 ;;
  *slow*) exec sleep 30 ;;
esac
`,
    { mode: 0o755 },
  );
});
afterAll(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

test('arguments reach virsh as one array: a name with spaces and shell syntax stays one argument', async () => {
  const v = new Virsh({ uri: 'qemu:///system', binary: bin });
  const name = 'a b; $(touch pwned) `id`';
  const out = await v.run(['domstate', '--', name]);
  expect(out.split('\n').slice(0, 4)).toEqual(['-c', 'qemu:///system', 'domstate', '--']);
  expect(out.split('\n')[4]).toBe(name);
  await expect(fs.access(path.join(process.cwd(), 'pwned'))).rejects.toThrow();
});

test('a domain libvirt does not know is DOMAIN_UNKNOWN; another failure LIBVIRT_ERROR with stderr', async () => {
  const v = new Virsh({ binary: bin });
  const unknown = await failure(v.domstate('nosuch'));
  expect(unknown.code).toBe('DOMAIN_UNKNOWN');
  expect(unknown.message).toContain("failed to get domain 'nosuch'");
  const broken = await failure(v.setvcpus('broken', 1));
  expect(broken.code).toBe('LIBVIRT_ERROR');
  expect(broken.message).toContain("unable to execute QEMU command 'device_del'");
  expect(broken.message).toContain('exit 1');
});

test('no virsh installed: PREREQUISITE_MISSING naming the Debian package', async () => {
  const err = await failure(
    new Virsh({ binary: path.join(dir, 'no-such-virsh') }).run(['version']),
  );
  expect(err.code).toBe('PREREQUISITE_MISSING');
  expect(err.message).toContain('libvirt-clients');
});

test('a call past its timeout is killed and reported with the timeout', async () => {
  const err = await failure(execVirsh(bin)(['domstate', 'slow'], 300));
  expect(err.code).toBe('LIBVIRT_ERROR');
  expect(err.message).toMatch(/no answer within 300 ms \(killed\)/);
});

test('recorded dommemstat and schedinfo output', async () => {
  expect(parseDommemstat(await fixture('dommemstat.txt'))).toEqual({
    actualBytes: 131072 * 1024,
    rssBytes: 48252 * 1024,
    raw: { actual: 131072, last_update: 0, rss: 48252 },
  });
  expect(parseSchedinfo(await fixture('schedinfo.txt'))).toMatchObject({
    Scheduler: 'posix',
    global_quota: -1,
  });
  expect(parseSchedinfo(await fixture('schedinfo-set.txt'))).toMatchObject({
    global_period: 100000,
    global_quota: 150000,
  });
});

test('recorded domstats --vcpu after a TCG unplug that outlived virsh: still listed, running, thread time and delay 0', async () => {
  const stats = parseDomstatsVcpu(await fixture('domstats-tcg-ejected.txt'));
  expect(stats.current).toBe(2);
  expect([...stats.states]).toEqual([
    [0, 1],
    [1, 1],
  ]);
  expect(stats.times.get(0)).toBeGreaterThan(0);
  expect(stats.delays.get(0)).toBeGreaterThan(0);
  expect([stats.times.get(1), stats.delays.get(1)]).toEqual([0, 0]);
});

test('recorded domstats --vcpu: each vCPU libvirt lists and its state', async () => {
  const stats = parseDomstatsVcpu(await fixture('domstats.txt'));
  expect(stats.current).toBe(3);
  expect(stats.maximum).toBe(4);
  expect([...stats.states]).toEqual([
    [0, 1],
    [1, 1],
    [2, 1],
  ]);
});
