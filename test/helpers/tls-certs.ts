/**
 * Test certificates made with the `openssl` CLI in a temp dir: a CA, a server (guest)
 * certificate for localhost/127.0.0.1, a client (host) certificate, a client certificate
 * from a second, unrelated CA, and an expired client certificate from the right CA.
 * EC P-256 keys: fast to make (the whole set takes ~100 ms).
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export interface CertPair {
  cert: string;
  key: string;
  certFile: string;
  keyFile: string;
}

export interface TestCerts {
  dir: string;
  ca: string;
  caFile: string;
  server: CertPair;
  client: CertPair;
  /** Signed by another CA: must be refused. */
  otherCaClient: CertPair;
  otherCa: string;
  /** Signed by the right CA but its validity ended yesterday: must be refused. */
  expiredClient: CertPair;
  cleanup(): void;
}

function openssl(cwd: string, args: string[]): void {
  execFileSync('openssl', args, { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
}

const KEY_ARGS = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];

function makeCa(dir: string, name: string): void {
  openssl(dir, [
    'req',
    '-x509',
    ...KEY_ARGS,
    '-keyout',
    `${name}.key`,
    '-out',
    `${name}.crt`,
    '-days',
    '2',
    '-subj',
    `/CN=nestbroker test ${name}`,
    '-addext',
    'basicConstraints=critical,CA:TRUE',
    '-addext',
    'keyUsage=critical,keyCertSign,cRLSign',
  ]);
}

/** A leaf certificate from CA `ca`, via `openssl ca` so the validity dates can be set. */
function makeLeaf(
  dir: string,
  ca: string,
  name: string,
  opts: { usage: 'serverAuth' | 'clientAuth'; san?: string; start?: string; end?: string },
): CertPair {
  openssl(dir, [
    'req',
    '-new',
    ...KEY_ARGS,
    '-keyout',
    `${name}.key`,
    '-out',
    `${name}.csr`,
    '-subj',
    `/CN=${name}`,
  ]);
  const db = path.join(dir, `${ca}.db`);
  if (!fs.existsSync(db)) {
    fs.mkdirSync(db);
    fs.writeFileSync(path.join(db, 'index.txt'), '');
    fs.writeFileSync(path.join(db, 'serial'), '1000\n');
  }
  const ext = [
    'basicConstraints=critical,CA:FALSE',
    'keyUsage=critical,digitalSignature',
    `extendedKeyUsage=${opts.usage}`,
    ...(opts.san ? [`subjectAltName=${opts.san}`] : []),
  ];
  fs.writeFileSync(
    path.join(dir, `${name}.cnf`),
    [
      '[ca]',
      'default_ca=testca',
      '[testca]',
      `dir=${db}`,
      'database=$dir/index.txt',
      'serial=$dir/serial',
      'new_certs_dir=$dir',
      'default_md=sha256',
      'policy=anything',
      'unique_subject=no',
      'copy_extensions=none',
      '[anything]',
      'commonName=supplied',
      '[leaf]',
      ...ext,
      '',
    ].join('\n'),
  );
  const dates =
    opts.start && opts.end ? ['-startdate', opts.start, '-enddate', opts.end] : ['-days', '1'];
  openssl(dir, [
    'ca',
    '-batch',
    '-notext',
    '-config',
    `${name}.cnf`,
    '-extensions',
    'leaf',
    '-cert',
    `${ca}.crt`,
    '-keyfile',
    `${ca}.key`,
    '-in',
    `${name}.csr`,
    '-out',
    `${name}.crt`,
    ...dates,
  ]);
  const certFile = path.join(dir, `${name}.crt`);
  const keyFile = path.join(dir, `${name}.key`);
  return {
    cert: fs.readFileSync(certFile, 'utf8'),
    key: fs.readFileSync(keyFile, 'utf8'),
    certFile,
    keyFile,
  };
}

/** openssl's ASN.1 time for `days` from now (negative: in the past). */
function asn1Time(days: number): string {
  const d = new Date(Date.now() + days * 86_400_000);
  const p = (n: number): string => String(n).padStart(2, '0');
  return `${d.getUTCFullYear()}${p(d.getUTCMonth() + 1)}${p(d.getUTCDate())}${p(d.getUTCHours())}${p(d.getUTCMinutes())}${p(d.getUTCSeconds())}Z`;
}

export function makeTestCerts(): TestCerts {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nestbroker-tls-'));
  try {
    makeCa(dir, 'ca');
    makeCa(dir, 'other-ca');
    const server = makeLeaf(dir, 'ca', 'guest-vm1', {
      usage: 'serverAuth',
      san: 'DNS:localhost,DNS:vm1.nestbroker.test,IP:127.0.0.1',
    });
    const client = makeLeaf(dir, 'ca', 'host-broker', { usage: 'clientAuth' });
    const otherCaClient = makeLeaf(dir, 'other-ca', 'intruder', { usage: 'clientAuth' });
    const expiredClient = makeLeaf(dir, 'ca', 'host-expired', {
      usage: 'clientAuth',
      start: asn1Time(-3),
      end: asn1Time(-1),
    });
    return {
      dir,
      ca: fs.readFileSync(path.join(dir, 'ca.crt'), 'utf8'),
      caFile: path.join(dir, 'ca.crt'),
      otherCa: fs.readFileSync(path.join(dir, 'other-ca.crt'), 'utf8'),
      server,
      client,
      otherCaClient,
      expiredClient,
      cleanup: () => fs.rmSync(dir, { recursive: true, force: true }),
    };
  } catch (err) {
    fs.rmSync(dir, { recursive: true, force: true });
    throw err;
  }
}
