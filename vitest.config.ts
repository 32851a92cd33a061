import { defineConfig } from "vitest/config"

// Tests that start real NATS servers and child processes share 2 cores: keep files
// in separate forks but not too many at once, and give process-level tests room.
export default defineConfig({
  test: {
    include: ["test/**/*.test.ts", "actors/**/*.test.ts", "shared/**/*.test.ts"],
    pool: "forks",
    maxWorkers: 2,
    testTimeout: 120_000,
    hookTimeout: 120_000,
    reporters: ["default"]
  }
})
