/**
 * How the daemons' argv is read without yargs (agent/common/daemon-args.ts): exactly the
 * forms units and scripts use are read here; anything else is left to yargs (null), which
 * prints the help and the errors it always did.
 */
import { quickDaemonArgs } from '../../../agent/common/daemon-args';
import { LOG_FORMATS } from '../../../agent/common/log';

const read = (...argv: string[]) => quickDaemonArgs(argv, LOG_FORMATS);

test.each([
  [['guest'], { daemon: 'guest', check: false }],
  [['guest', '--config', '/etc/g.yaml'], { daemon: 'guest', config: '/etc/g.yaml', check: false }],
  [['guest', '--config=/etc/g.yaml'], { daemon: 'guest', config: '/etc/g.yaml', check: false }],
  [['host', '-c', 'h.yaml', '--check'], { daemon: 'host', config: 'h.yaml', check: true }],
  [['guest', '-c', 'g.yaml', '--check'], { daemon: 'guest', config: 'g.yaml', check: true }],
  [
    ['host', '--log-format', 'json', '--config', 'h.yaml'],
    { daemon: 'host', config: 'h.yaml', logFormat: 'json', check: false },
  ],
])('%j is read without yargs', (argv, expected) => {
  expect(read(...argv)).toEqual(expected);
});

test.each([
  [[]],
  [['wait-ready', 'guest']],
  [['guest', '--help']],
  [['guest', '--config']], // a missing value
  [['guest', '--config', '--check']],
  [['guest', '--config', 'a', '--config', 'b']], // yargs would make an array
  [['host', '--log-format', 'xml']], // not a format: yargs names the choices
  [['host', '--check=true']],
  [['guest', 'extra']],
])('%j is left to yargs', (argv) => {
  expect(read(...argv)).toBeNull();
});
