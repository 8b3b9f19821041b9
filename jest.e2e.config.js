/** The real-guest test alone (`make e2e`): QEMU, a Debian guest, systemd. */
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
