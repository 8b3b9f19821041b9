/**
 * The real-guest tests alone (`make e2e`): a Debian guest with systemd under QEMU
 * (guest.e2e.test.ts) and under libvirt (libvirt.e2e.test.ts), one after the other
 * (`--runInBand`).
 */
module.exports = {
  testEnvironment: 'node',
  roots: ['<rootDir>/test/e2e'],
  testMatch: ['**/*.e2e.test.ts'],
  transform: {
    '^.+\\.ts$': ['ts-jest', { tsconfig: 'tsconfig.jest.json' }],
  },
  // Each step has its own bounded timeout in the test; this is the backstop.
  testTimeout: 15 * 60 * 1000,
};
