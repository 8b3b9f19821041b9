/**
 * `make deb` (debian/, docs/install.md "Installing the Debian package"): the package is
 * built with debhelper, then read with dpkg-deb (files, conffiles, Depends, maintainer
 * scripts) and extracted into a throwaway root, where the installed programs run with
 * only the dependencies the package carries. Nothing is installed on this machine.
 * Needs debhelper and go-md2man (`make test` installs them; docs/install.md).
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parse as parseYaml } from 'yaml';
import { validateGuestConfig } from '../../../agent/guest/config';

jest.setTimeout(300_000);

const REPO = path.resolve(__dirname, '../../..');
const VERSION = execFileSync('dpkg-parsechangelog', ['-l', 'debian/changelog', '-SVersion'], {
  cwd: REPO,
  encoding: 'utf8',
}).trim();
const DEB = path.join(REPO, 'dist', `nestbroker_${VERSION}_all.deb`);
let root: string;
let files: string[];

beforeAll(() => {
  const make = spawnSync('make', ['deb'], { cwd: REPO, encoding: 'utf8' });
  if (make.status !== 0) throw new Error(`make deb failed:\n${make.stdout}\n${make.stderr}`);
  root = mkdtempSync(path.join(os.tmpdir(), 'nb-deb-'));
  execFileSync('dpkg-deb', ['-x', DEB, root]);
  execFileSync('dpkg-deb', ['-e', DEB, path.join(root, 'DEBIAN')]);
  files = execFileSync('dpkg-deb', ['-c', DEB], { encoding: 'utf8', maxBuffer: 64 << 20 })
    .split('\n')
    .filter(Boolean)
    .map((l) => l.split(/\s+/).slice(5).join(' ').replace(/^\.\//, '/'));
});

afterAll(() => {
  if (root) rmSync(root, { recursive: true, force: true });
});

const field = (name: string) =>
  execFileSync('dpkg-deb', ['-f', DEB, name], { encoding: 'utf8' }).trim();

test('version and architecture from debian/changelog; Depends: nodejs (>= 18)', () => {
  expect(VERSION).toBe(JSON.parse(readFileSync(path.join(REPO, 'package.json'), 'utf8')).version);
  expect(field('Package')).toBe('nestbroker');
  expect(field('Architecture')).toBe('all');
  expect(field('Depends')).toBe('nodejs (>= 18)');
});

test('the program under /usr, units, udev rule, man pages, completion; configs are conffiles', () => {
  for (const f of [
    '/usr/bin/nestbroker',
    '/usr/bin/nestctl',
    '/usr/lib/nestbroker/dist/agent/cli/nestbroker.js',
    '/usr/lib/nestbroker/node_modules/pino/package.json',
    '/lib/systemd/system/nestbroker-guest.service',
    '/lib/systemd/system/nestbroker-host.service',
    '/lib/udev/rules.d/99-nestbroker.rules',
    '/usr/share/man/man1/nestctl.1.gz',
    '/usr/share/man/man8/nestbroker.8.gz',
    '/usr/share/bash-completion/completions/nestctl',
    '/usr/lib/sysusers.d/nestbroker.conf',
    '/usr/share/doc/nestbroker/copyright',
    '/usr/share/doc/nestbroker/errors.md.gz',
  ])
    expect(files).toContain(f);
  // Nothing outside /usr, /lib (units, udev) and /etc/nestbroker.
  for (const f of files)
    expect(f).toMatch(/^\/($|usr\/|lib\/($|systemd\/|udev\/)|etc\/($|nestbroker\/))/);
  expect(
    readFileSync(path.join(root, 'DEBIAN/conffiles'), 'utf8').split('\n').filter(Boolean).sort(),
  ).toEqual(['/etc/nestbroker/guest.yaml', '/etc/nestbroker/host.yaml']);
  // The guest's conffile is valid as shipped and lists no project (the examples are
  // commented out): the agent starts when the channel appears, before anyone edited it.
  const guestYaml = readFileSync(path.join(root, 'etc/nestbroker/guest.yaml'), 'utf8');
  expect(guestYaml).toMatch(/^# {3}- name: web$/m);
  expect(validateGuestConfig(parseYaml(guestYaml), 'guest.yaml').projects).toEqual([]);
  // The units run the packaged wrappers, not /usr/local.
  const unit = readFileSync(path.join(root, 'lib/systemd/system/nestbroker-host.service'), 'utf8');
  expect(unit).toMatch(/^ExecStart=\/usr\/bin\/nestbroker host /m);
  expect(unit).not.toContain('/usr/local');
  expect(readFileSync(path.join(root, 'usr/bin/nestctl'), 'utf8')).toBe(
    '#!/bin/sh\nexec /usr/bin/node /usr/lib/nestbroker/dist/agent/cli/nestctl.js "$@"\n',
  );
});

test('no development dependency is bundled', () => {
  const lock = JSON.parse(readFileSync(path.join(REPO, 'package-lock.json'), 'utf8')) as {
    packages: Record<string, { dev?: boolean }>;
  };
  const dev = Object.entries(lock.packages)
    .filter(([p, m]) => p && m.dev && p.split('node_modules/').length === 2)
    .map(([p]) => `/usr/lib/nestbroker/${p}/`);
  expect(dev.length).toBeGreaterThan(10); // jest, typescript, eslint, prettier, …
  const bundled = new Set(files);
  expect(dev.filter((d) => bundled.has(d))).toEqual([]);
});

test('maintainer scripts: host unit enabled and started, guest unit enabled only, the group made', () => {
  const postinst = readFileSync(path.join(root, 'DEBIAN/postinst'), 'utf8');
  expect(postinst).toContain('groupadd --system nestbroker');
  expect(postinst).toMatch(
    /deb-systemd-helper (unmask|enable|update-state|was-enabled) 'nestbroker-host\.service'/,
  );
  expect(postinst).toMatch(
    /deb-systemd-helper (unmask|enable|update-state|was-enabled) 'nestbroker-guest\.service'/,
  );
  const starts = [...postinst.matchAll(/deb-systemd-invoke \$_dh_action (.*?) /g)].map((m) => m[1]);
  expect(starts.join(' ')).toContain('nestbroker-host.service');
  expect(starts.join(' ')).not.toContain('nestbroker-guest.service');
});

test('the extracted programs run with the dependencies the package carries alone', () => {
  for (const cli of ['nestctl.js', 'nestbroker.js']) {
    const r = spawnSync(
      process.execPath,
      [path.join(root, 'usr/lib/nestbroker/dist/agent/cli', cli), '--help'],
      { encoding: 'utf8', cwd: root, env: { PATH: process.env.PATH } },
    );
    expect({ cli, status: r.status, stderr: r.stderr }).toEqual({ cli, status: 0, stderr: '' });
    expect(r.stdout).toMatch(cli === 'nestctl.js' ? /reclaim/ : /wait-ready/);
  }
});

test('lintian finds nothing (each remaining tag is overridden with its reason)', () => {
  const r = spawnSync('lintian', ['--tag-display-limit', '0', DEB], { encoding: 'utf8' });
  const tags = `${r.stdout}${r.stderr}`.split('\n').filter((l) => /^[EW]: /.test(l));
  expect(tags).toEqual([]);
});
