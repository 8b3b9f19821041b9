/**
 * agent/common/nss.ts against this machine's real user and group databases through
 * getent(1): root, a group this test creates with groupadd (and removes), a user it
 * creates in that group, and names that do not exist.
 */
import { execFileSync } from 'node:child_process';
import { isNestError } from '../../../agent/common/errors';
import { lookupGroup, lookupUser } from '../../../agent/common/nss';
import { ownerOf } from '../../../agent/guest/projects';
import type { ProjectConfig } from '../../../agent/guest/config';

const GROUP = `nbnss${process.pid % 100000}`;
const USER = `${GROUP}u`;
let gid: number;
let uid: number;

beforeAll(() => {
  execFileSync('groupadd', [GROUP]);
  execFileSync('useradd', ['--no-create-home', '-g', GROUP, '-s', '/usr/sbin/nologin', USER]);
  gid = Number(execFileSync('getent', ['group', GROUP], { encoding: 'utf8' }).split(':')[2]);
  uid = Number(execFileSync('id', ['-u', USER], { encoding: 'utf8' }).trim());
});

afterAll(() => {
  execFileSync('userdel', [USER], { stdio: 'ignore' });
  execFileSync('groupdel', [GROUP], { stdio: 'ignore' });
});

function thrown(f: () => unknown): unknown {
  try {
    f();
  } catch (err) {
    return err;
  }
  throw new Error('expected a throw');
}

test('root by name and by uid', () => {
  expect(lookupUser('root', 'user')).toEqual({ name: 'root', uid: 0, gid: 0, home: '/root' });
  expect(lookupUser(0, 'user')).toMatchObject({ name: 'root', uid: 0 });
  expect(lookupGroup('root', 'g')).toEqual({ name: 'root', gid: 0 });
});

test('a group and user made by groupadd/useradd are found with the ids the system gave them', () => {
  expect(lookupGroup(GROUP, 'socketGroup')).toEqual({ name: GROUP, gid });
  expect(lookupGroup(gid, 'socketGroup')).toEqual({ name: GROUP, gid });
  expect(lookupUser(USER, 'u')).toMatchObject({ name: USER, uid, gid });
});

test('an unknown group or user: CONFIG_INVALID, one message naming the field and the value', () => {
  const g = thrown(() => lookupGroup(`${GROUP}-none`, 'socketGroup'));
  expect(isNestError(g, 'CONFIG_INVALID')).toBe(true);
  expect((g as Error).message).toBe(
    `socketGroup: no group "${GROUP}-none" (looked up through NSS: getent group)`,
  );
  expect((g as { problems: unknown[] }).problems).toEqual([
    { field: 'socketGroup', value: `${GROUP}-none`, message: expect.stringContaining('no group') },
  ]);
  const u = thrown(() => lookupUser('nb-no-such-user', 'projects[name=web].command.user'));
  expect(isNestError(u, 'CONFIG_INVALID')).toBe(true);
  expect((u as Error).message).toMatch(
    /^projects\[name=web\]\.command\.user: no user "nb-no-such-user"/,
  );
});

test("a project's owner: a name through NSS; a uid without entry runs as itself; an unknown name refused", async () => {
  const p = (user: string | number) =>
    ({ name: 'web', command: { user } }) as unknown as ProjectConfig;
  expect(await ownerOf(p(USER))).toEqual({ uid, gid });
  expect(await ownerOf(p(4_000_123))).toEqual({ uid: 4_000_123, gid: 4_000_123 });
  await expect(ownerOf(p('nb-no-such-user'))).rejects.toMatchObject({ code: 'CONFIG_INVALID' });
});
