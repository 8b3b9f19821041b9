/** Tests run as root against the real kernel; see README "Tests". */
module.exports = {
  testEnvironment: 'node',
  roots: ['<rootDir>/test'],
  testMatch: ['**/*.test.ts'],
  // The real-guest test boots QEMU: `make e2e` runs it (jest.e2e.config.js).
  testPathIgnorePatterns: ['/node_modules/', '<rootDir>/test/e2e/'],
  transform: {
    // Type-checking is done once by `tsc` in `make test`; here we only transpile
    // (isolatedModules in tsconfig.jest.json makes ts-jest transpile file by file).
    '^.+\\.ts$': ['ts-jest', { tsconfig: 'tsconfig.jest.json' }],
  },
  testTimeout: 60000,
};
