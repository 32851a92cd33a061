// Implements: starting a local `nats-server` child process — for `flotilla up` when no
// server is given, and for tests (test/support/nats.ts, test/faults/). Writes a config
// file to a temp dir (host, port, max_payload, JetStream store, optional monitoring port,
// cluster block and verbatim extra config such as accounts and users; the file is mode
// 0600, the dir 0700), waits until the server accepts connections, and can stop, SIGKILL
// or restart it on the same ports and store dir. `startLocalNatsCluster` starts N such
// servers clustered over loopback routes and waits until every route is up.
// Does not own: connecting to it (shared/bus/nats.ts), accounts and real-host cluster
// configs (infra/nats/).
//
// The binary comes from $NATS_SERVER_BIN, PATH, /usr/sbin, /usr/bin or /usr/local/bin
// (Debian/Ubuntu: `apt-get install -y nats-server`, 2.9.x). Port 0 means "any free port":
// the server picks one (`port: -1`), we read it from its log and keep it for restarts.
import { spawn } from "node:child_process"
import type { ChildProcess } from "node:child_process"
import * as fs from "node:fs"
import * as net from "node:net"
import * as os from "node:os"
import * as path from "node:path"
import * as Effect from "effect/Effect"
import type * as Scope from "effect/Scope"

export interface LocalNatsServerOptions {
  /** Client port; 0 (default) = a free port chosen by the server, kept across restarts. */
  readonly port?: number
  /** Interface to listen on; default "127.0.0.1" (use "0.0.0.0" to serve other hosts). */
  readonly host?: string
  /** Largest message in bytes; server default 1 MiB, nats-server caps it at 64 MiB. */
  readonly maxPayload?: number
  /** Enable JetStream (for the JetStream checkpoint store). */
  readonly jetstream?: boolean
  /** JetStream store directory; default a temp dir removed by stop(). */
  readonly storeDir?: string
  /** Path to the binary; default: found as described at the top of this file. */
  readonly binary?: string
  /** How long to wait for the server to accept connections; default 15 s. */
  readonly startTimeoutMs?: number
  /** Monitoring HTTP port (/varz, /connz, /routez): undefined = none, 0 = a free port. */
  readonly httpPort?: number
  /** `server_name` (required by clustered JetStream; shown by /connz). */
  readonly serverName?: string
  /**
   * Appended verbatim to the config: accounts and users (shared/bus/permissions.ts
   * `accountBlock`), authorization. It may hold passwords: the file is readable by its owner only.
   */
  readonly extraConfig?: string
  /**
   * A config file included first (e.g. infra/nats/nats.conf): what the options above set
   * overrides it (nats-server keeps a key's last value), so a shipped config runs on a free
   * port with a temp JetStream store.
   */
  readonly baseConfig?: string
  /** Join a cluster: listen for routes on `port` (on `host`) and dial `routes`. */
  readonly cluster?: {
    readonly name: string
    readonly port: number
    /** e.g. "nats-route://127.0.0.1:6223" */
    readonly routes: ReadonlyArray<string>
  }
}

export interface LocalNatsServer {
  readonly url: string
  readonly port: number
  readonly host: string
  /** `http://host:port` of the monitoring endpoint, when `httpPort` was given. */
  readonly monitorUrl: string | undefined
  readonly serverName: string | undefined
  /** Stops the server (SIGTERM, then SIGKILL after 5 s) and removes its temp dir. */
  stop(): Promise<void>
  /** Stops (SIGTERM) if running, then starts it again on the same ports, config and store dir. */
  restart(): Promise<void>
  /** SIGKILL (a crash: no lame-duck, no goodbye to clients or routes); restart() brings it back. */
  kill(): Promise<void>
  /** Whether the server process is up (false after kill() or stop()). */
  running(): boolean
}

export class NatsServerNotFoundError extends Error {
  override readonly name = "NatsServerNotFoundError"
}

const SEARCH_DIRS = ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"]

/** The nats-server binary's path, or undefined when none is installed. */
export const findNatsServerBinary = (): string | undefined => {
  const fromEnv = process.env["NATS_SERVER_BIN"]
  if (fromEnv !== undefined && fromEnv !== "" && isExecutable(fromEnv)) return fromEnv
  const dirs = [...(process.env["PATH"] ?? "").split(path.delimiter).filter((d) => d !== ""), ...SEARCH_DIRS]
  for (const dir of dirs) {
    const candidate = path.join(dir, "nats-server")
    if (isExecutable(candidate)) return candidate
  }
  return undefined
}

const isExecutable = (file: string): boolean => {
  try {
    fs.accessSync(file, fs.constants.X_OK)
    return fs.statSync(file).isFile()
  } catch {
    return false
  }
}

export const startLocalNatsServer = async (options: LocalNatsServerOptions = {}): Promise<LocalNatsServer> => {
  const binary = options.binary ?? findNatsServerBinary()
  if (binary === undefined || !isExecutable(binary)) {
    throw new NatsServerNotFoundError(
      (options.binary !== undefined
        ? `nats-server binary ${options.binary} not found or not executable. `
        : "nats-server binary not found (looked at $NATS_SERVER_BIN, PATH, " + SEARCH_DIRS.join(", ") + "). ") +
        "Install it: `apt-get install -y nats-server` (Debian/Ubuntu), `brew install nats-server` (macOS), " +
        "or download a release from https://github.com/nats-io/nats-server/releases; " +
        "or point Flotilla at a running server (--nats nats://host:4222 / $NATS_URL)."
    )
  }
  const host = options.host ?? "127.0.0.1"
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "flotilla-nats-"))
  const storeDir = options.storeDir ?? path.join(dir, "jetstream")
  const configFile = path.join(dir, "nats-server.conf")
  const timeoutMs = options.startTimeoutMs ?? 15_000
  let port = options.port ?? 0
  const httpPort = options.httpPort === 0 ? await freePort(host === "0.0.0.0" ? "127.0.0.1" : host) : options.httpPort
  let child: ChildProcess | undefined

  const writeConfig = () => {
    const lines = [
      // nats-server resolves an include against the including file's directory, absolute or not
      ...(options.baseConfig !== undefined ? [`include ${JSON.stringify(path.relative(dir, path.resolve(options.baseConfig)))}`] : []),
      `host: ${JSON.stringify(host)}`,
      `port: ${port === 0 ? -1 : port}`
    ]
    if (options.serverName !== undefined) lines.push(`server_name: ${JSON.stringify(options.serverName)}`)
    if (httpPort !== undefined) lines.push(`http: ${JSON.stringify(`${host}:${httpPort}`)}`)
    if (options.maxPayload !== undefined) lines.push(`max_payload: ${options.maxPayload}`)
    if (options.jetstream === true) lines.push(`jetstream {`, `  store_dir: ${JSON.stringify(storeDir)}`, `}`)
    if (options.cluster !== undefined) {
      const c = options.cluster
      lines.push(
        `cluster {`,
        `  name: ${JSON.stringify(c.name)}`,
        `  listen: ${JSON.stringify(`${host}:${c.port}`)}`,
        `  routes: [${c.routes.map((r) => JSON.stringify(r)).join(", ")}]`,
        `}`
      )
    }
    if (options.extraConfig !== undefined) lines.push(options.extraConfig)
    fs.writeFileSync(configFile, lines.join("\n") + "\n", { mode: 0o600 })
    fs.chmodSync(configFile, 0o600)
  }

  const killOnExit = () => {
    child?.kill("SIGKILL")
  }

  const launch = async () => {
    writeConfig()
    const started = await spawnAndWait(binary, configFile, host === "0.0.0.0" ? "127.0.0.1" : host, timeoutMs)
    child = started.child
    port = started.port
    process.once("exit", killOnExit)
  }

  const kill = async (signal: "SIGTERM" | "SIGKILL" = "SIGTERM") => {
    const c = child
    child = undefined
    process.removeListener("exit", killOnExit)
    if (c !== undefined) await terminate(c, signal)
  }

  try {
    await launch()
  } catch (e) {
    fs.rmSync(dir, { recursive: true, force: true })
    throw e
  }
  const urlHost = host === "0.0.0.0" ? "127.0.0.1" : host
  const fixedPort = port
  return {
    url: `nats://${urlHost}:${fixedPort}`,
    port: fixedPort,
    host,
    monitorUrl: httpPort === undefined ? undefined : `http://${urlHost}:${httpPort}`,
    serverName: options.serverName,
    stop: async () => {
      await kill()
      fs.rmSync(dir, { recursive: true, force: true })
    },
    restart: async () => {
      await kill()
      await launch()
    },
    kill: () => kill("SIGKILL"),
    running: () => child !== undefined && child.exitCode === null && child.signalCode === null
  }
}

// ---------------------------------------------------------------- clusters

export interface LocalNatsClusterOptions {
  /** Number of servers; default 3. */
  readonly size?: number
  /** JetStream on every node (clustered: the meta group needs a majority up). */
  readonly jetstream?: boolean
  readonly maxPayload?: number
  /** Cluster name; default "flotilla-local". */
  readonly name?: string
  readonly binary?: string
  /** Per node start and route wait; default 20 s. */
  readonly startTimeoutMs?: number
}

export interface LocalNatsCluster {
  /** Every node's client URL, node order. */
  readonly urls: ReadonlyArray<string>
  /** The nodes (each with a monitoring port), each stop/kill/restart-able on its own. */
  readonly servers: ReadonlyArray<LocalNatsServer>
  /** Wait until every running node has a route to every other running node. */
  waitForRoutes(timeoutMs?: number): Promise<void>
  /** Stop every node and remove their dirs. */
  stop(): Promise<void>
}

/**
 * N nats-servers on loopback, fully meshed by explicit routes (`cluster { routes }`),
 * resolved once every node reports a route to every other (monitoring /routez). Each
 * node's restart() waits for its routes again. Clients should be given every URL.
 */
export const startLocalNatsCluster = async (options: LocalNatsClusterOptions = {}): Promise<LocalNatsCluster> => {
  const size = options.size ?? 3
  const host = "127.0.0.1"
  const name = options.name ?? "flotilla-local"
  const timeoutMs = options.startTimeoutMs ?? 20_000
  // ports known up front: every node's routes name every other node's cluster port
  const ports: Array<{ client: number; cluster: number; http: number }> = []
  const taken = new Set<number>()
  const fresh = async () => {
    for (;;) {
      const p = await freePort(host)
      if (!taken.has(p)) {
        taken.add(p)
        return p
      }
    }
  }
  for (let i = 0; i < size; i++) ports.push({ client: await fresh(), cluster: await fresh(), http: await fresh() })
  const raw: Array<LocalNatsServer> = []
  const stopAll = () => Promise.all(raw.map((s) => s.stop())).then(() => undefined)
  const started = await Promise.allSettled(
    ports.map((p, i) =>
      startLocalNatsServer({
        host,
        port: p.client,
        httpPort: p.http,
        serverName: `${name}-${i + 1}`,
        jetstream: options.jetstream,
        maxPayload: options.maxPayload,
        binary: options.binary,
        startTimeoutMs: timeoutMs,
        cluster: { name, port: p.cluster, routes: ports.filter((_, j) => j !== i).map((q) => `nats-route://${host}:${q.cluster}`) }
      })
    )
  )
  for (const r of started) if (r.status === "fulfilled") raw.push(r.value)
  const failed = started.find((r) => r.status === "rejected")
  if (failed !== undefined) {
    await stopAll()
    throw (failed as PromiseRejectedResult).reason
  }
  const waitForRoutes = async (waitMs = timeoutMs) => {
    const deadline = Date.now() + waitMs
    for (;;) {
      const live = raw.filter((s) => s.running())
      const counts = await Promise.all(live.map((s) => routeCount(s.monitorUrl!)))
      if (counts.every((n) => n >= live.length - 1)) return
      if (Date.now() > deadline) {
        throw new Error(`nats cluster: routes not up within ${waitMs} ms (${live.map((s, i) => `${s.serverName}: ${counts[i]}`).join(", ")} of ${live.length - 1})`)
      }
      await new Promise((r) => setTimeout(r, 50))
    }
  }
  try {
    await waitForRoutes()
  } catch (e) {
    await stopAll()
    throw e
  }
  const servers = raw.map((s): LocalNatsServer => ({
    ...s,
    restart: async () => {
      await s.restart()
      await waitForRoutes()
    }
  }))
  return { urls: servers.map((s) => s.url), servers, waitForRoutes, stop: stopAll }
}

/** The node's number of routes (-1 when its monitoring endpoint does not answer). */
const routeCount = async (monitorUrl: string): Promise<number> => {
  try {
    const res = await fetch(`${monitorUrl}/routez`, { signal: AbortSignal.timeout(2_000) })
    const j = (await res.json()) as { num_routes?: number }
    return j.num_routes ?? 0
  } catch {
    return -1
  }
}

const freePort = (host: string): Promise<number> =>
  new Promise((resolve, reject) => {
    const srv = net.createServer()
    srv.once("error", reject)
    srv.listen(0, host, () => {
      const addr = srv.address()
      const p = typeof addr === "object" && addr !== null ? addr.port : 0
      srv.close(() => resolve(p))
    })
  })

/** The same, as a scoped resource: stopped when the scope closes. */
export const localNatsServer = (options: LocalNatsServerOptions = {}): Effect.Effect<LocalNatsServer, Error, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.tryPromise({ try: () => startLocalNatsServer(options), catch: (e) => (e instanceof Error ? e : new Error(String(e))) }),
    (server) => Effect.promise(() => server.stop())
  )

const LISTENING = /Listening for client connections on ([^\s:]+|\[[^\]]+\]):(\d+)/

/** Spawns the server and resolves once it logged "Server is ready" and a TCP connect succeeds. */
const spawnAndWait = (binary: string, configFile: string, connectHost: string, timeoutMs: number) =>
  new Promise<{ child: ChildProcess; port: number }>((resolve, reject) => {
    const child = spawn(binary, ["-c", configFile], { stdio: ["ignore", "pipe", "pipe"] })
    const tail: Array<string> = []
    let port: number | undefined
    let settled = false
    const fail = (why: string) => {
      if (settled) return
      settled = true
      clearTimeout(timer)
      child.kill("SIGKILL")
      reject(new Error(`nats-server ${why}\n  config: ${configFile}\n  log tail:\n    ${tail.join("\n    ")}`))
    }
    const timer = setTimeout(() => fail(`did not become ready within ${timeoutMs} ms`), timeoutMs)
    const onLine = (line: string) => {
      tail.push(line)
      if (tail.length > 30) tail.shift()
      if (settled) return
      const m = LISTENING.exec(line)
      if (m !== null) port = Number(m[2])
      if (line.includes("Server is ready")) {
        if (port === undefined) return fail("is ready but logged no client port")
        const p = port
        waitForTcp(connectHost, p, timeoutMs).then(
          () => {
            if (settled) return
            settled = true
            clearTimeout(timer)
            resolve({ child, port: p })
          },
          (e) => fail(`accepts no connections on port ${p}: ${String(e)}`)
        )
      }
    }
    for (const stream of [child.stdout, child.stderr]) {
      let buffered = ""
      stream?.setEncoding("utf8")
      stream?.on("data", (chunk: string) => {
        buffered += chunk
        let nl: number
        while ((nl = buffered.indexOf("\n")) >= 0) {
          onLine(buffered.slice(0, nl))
          buffered = buffered.slice(nl + 1)
        }
      })
    }
    child.once("error", (e) => fail(`failed to start (${binary}): ${e.message}`))
    child.once("exit", (code, signal) => fail(`exited early (code ${code}, signal ${signal})`))
  })

const waitForTcp = (host: string, port: number, timeoutMs: number): Promise<void> => {
  const deadline = Date.now() + timeoutMs
  return new Promise((resolve, reject) => {
    const attempt = () => {
      const socket = net.connect({ host, port })
      socket.once("connect", () => {
        socket.destroy()
        resolve()
      })
      socket.once("error", (e) => {
        socket.destroy()
        if (Date.now() > deadline) reject(e)
        else setTimeout(attempt, 50)
      })
    }
    attempt()
  })
}

const terminate = (child: ChildProcess, signal: "SIGTERM" | "SIGKILL"): Promise<void> =>
  new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) return resolve()
    const hard = setTimeout(() => child.kill("SIGKILL"), 5_000)
    child.once("exit", () => {
      clearTimeout(hard)
      resolve()
    })
    child.kill(signal)
  })
