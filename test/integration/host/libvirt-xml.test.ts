/**
 * Every libvirt domain XML the docs ship validates against libvirt's own schema with
 * `virt-xml-validate` (libvirt-clients; `make test-deps` installs it): docs/libvirt/*.xml,
 * and every ```xml block of docs/*.md whose root is <domain>. Also the test domain the
 * integration test defines (test/fixtures/libvirt/nbfix-define.xml), and the real-guest
 * libvirt test's (docs/libvirt/nbguest-tcg.xml with its name and share replaced).
 */
import { execFile } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);
const ROOT = path.resolve(__dirname, '../../..');

async function validate(file: string): Promise<{ file: string; ok: boolean; said: string }> {
  try {
    const { stdout, stderr } = await run('virt-xml-validate', [file, 'domain'], {
      timeout: 60_000,
    });
    return { file, ok: true, said: (stdout + stderr).trim() };
  } catch (err) {
    const e = err as { stdout?: string; stderr?: string; message: string };
    return { file, ok: false, said: `${e.stdout ?? ''}${e.stderr ?? ''}`.trim() || e.message };
  }
}

test('every domain XML in docs/ and the test domain validate with virt-xml-validate', async () => {
  await fs.access('/usr/bin/virt-xml-validate').catch(() => {
    throw new Error("virt-xml-validate is missing: run 'make test-deps' (libvirt-clients)");
  });
  const files = [
    ...(await fs.readdir(path.join(ROOT, 'docs', 'libvirt')))
      .filter((f) => f.endsWith('.xml'))
      .map((f) => path.join(ROOT, 'docs', 'libvirt', f)),
    path.join(ROOT, 'test', 'fixtures', 'libvirt', 'nbfix-define.xml'),
  ];
  const tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-xml-'));
  try {
    for (const md of (await fs.readdir(path.join(ROOT, 'docs'))).filter((f) => f.endsWith('.md'))) {
      const text = await fs.readFile(path.join(ROOT, 'docs', md), 'utf8');
      let i = 0;
      for (const m of text.matchAll(/```xml\n([\s\S]*?)```/g))
        if (/^\s*<domain[\s>]/.test(m[1])) {
          const f = path.join(tmp, `${md}.${i++}.xml`);
          await fs.writeFile(f, m[1]);
          files.push(f);
        }
    }
    expect(files.length).toBeGreaterThanOrEqual(2);
    const results = await Promise.all(files.map(validate));
    expect(results.filter((r) => !r.ok)).toEqual([]);
    for (const r of results) expect(r.said).toMatch(/validates$/);
  } finally {
    await fs.rm(tmp, { recursive: true, force: true });
  }
});

test('the real-guest libvirt test defines the documented nbguest-tcg.xml with only its name and share changed', async () => {
  const { DOMAIN_XML, LibvirtVm } = await import('../../e2e/libvirt-vm');
  const doc = await fs.readFile(DOMAIN_XML, 'utf8');
  const xml = LibvirtVm.domainXml(doc, 'nbe2e-12345', ROOT);
  // Line by line, every difference is the name or the share's directory.
  const a = doc.split('\n');
  const b = xml.split('\n');
  expect(b).toHaveLength(a.length);
  const changed = a.flatMap((line, i) => (line === b[i] ? [] : [[line, b[i]]]));
  for (const [from, to] of changed)
    expect(
      from
        .split('/var/lib/libvirt/images/nbguest/share')
        .join(ROOT)
        .split('nbguest')
        .join('nbe2e-12345'),
    ).toBe(to);
  expect(changed.length).toBeGreaterThanOrEqual(6);
  const tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-xml-'));
  try {
    const f = path.join(tmp, 'nbe2e.xml');
    await fs.writeFile(f, xml);
    expect(await validate(f)).toMatchObject({ ok: true });
  } finally {
    await fs.rm(tmp, { recursive: true, force: true });
  }
});
