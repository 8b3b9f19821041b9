/**
 * The repository explains itself (CONTRIBUTING.md, "Comments say why, and cite what is in
 * reach"): nothing in it points at a file outside it or at a tracker's ticket number, the
 * documents a newcomer looks for are there, and every `docs/*.md` a file cites exists, with
 * the section it names in quotes.
 *
 * The searched-for patterns are built from pieces so that this file does not match itself.
 * CHANGELOG.md is the one file allowed to name ticket numbers.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

const ROOT = path.resolve(__dirname, '../../..');

/** Lines of `git grep -nE <pattern>` over the tracked files; exit 1 means "none". */
function gitGrep(pattern: string, ...pathspec: string[]): string[] {
  try {
    const out = execFileSync('git', ['grep', '-nE', pattern, '--', '.', ...pathspec], {
      cwd: ROOT,
      encoding: 'utf8',
      maxBuffer: 64 * 1024 * 1024,
    });
    return out.split('\n').filter((l) => l !== '');
  } catch (err) {
    const e = err as { status?: number };
    if (e.status === 1) return [];
    throw err;
  }
}

// "design" ".md", the VM notes file, and the word for a tracker ticket followed by a number.
const OUTSIDE = [
  ['design', '\\.md'].join(''),
  ['vm-e2e', '-notes'].join(''),
  ['[Ii]ss', 'ue #?[0-9]'].join(''),
].join('|');

test('nothing refers to a file outside the repository or to a ticket number', () => {
  expect(gitGrep(OUTSIDE, ':!CHANGELOG.md')).toEqual([]);
});

test('the search itself finds what it looks for (a pattern that matches nothing proves nothing)', () => {
  // The pathspec works (CHANGELOG.md, excluded above, is found when searched alone), and
  // the pattern matches a reference to a sketch outside the repository but not a doc in it.
  expect(gitGrep('Unreleased', 'CHANGELOG.md').length).toBeGreaterThan(0);
  const sample = ['see ', 'design', '.md', ' and ', 'iss', 'ue 5'].join('');
  expect(new RegExp(OUTSIDE).test(sample)).toBe(true);
  expect(new RegExp(OUTSIDE).test('see docs/architecture.md')).toBe(false);
});

test.each(['LICENSE', 'CONTRIBUTING.md', 'CHANGELOG.md', 'docs/architecture.md'])(
  '%s exists and is not empty',
  (file) => {
    expect(fs.statSync(path.join(ROOT, file)).size).toBeGreaterThan(0);
  },
);

test('LICENSE is the MIT licence package.json declares', () => {
  const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as {
    license: string;
  };
  expect(pkg.license).toBe('MIT');
  expect(fs.readFileSync(path.join(ROOT, 'LICENSE'), 'utf8')).toMatch(/^MIT License\n/);
});

test('README.md links docs/architecture.md', () => {
  const readme = fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8');
  expect(readme).toMatch(/\]\(docs\/architecture\.md(#[a-z0-9-]+)?\)/);
});

test('every docs/*.md that is cited exists, and so does the section named in quotes', () => {
  const problems: string[] = [];
  for (const hit of gitGrep('docs/[A-Za-z0-9_-]+\\.md')) {
    const [, where, line] = /^([^:]+:\d+):(.*)$/.exec(hit) ?? [];
    if (line === undefined) continue;
    for (const m of line.matchAll(/docs\/([A-Za-z0-9_-]+\.md)(?:[,:]? "([^"]+)")?/g)) {
      const doc = path.join(ROOT, 'docs', m[1]);
      if (!fs.existsSync(doc)) {
        problems.push(`${where}: docs/${m[1]} does not exist`);
        continue;
      }
      if (m[2] === undefined) continue;
      const headings = fs
        .readFileSync(doc, 'utf8')
        .split('\n')
        .filter((l) => /^#+ /.test(l))
        .map((l) => l.toLowerCase());
      if (!headings.some((h) => h.includes(m[2].toLowerCase())))
        problems.push(`${where}: docs/${m[1]} has no section "${m[2]}"`);
    }
  }
  expect(problems).toEqual([]);
});
