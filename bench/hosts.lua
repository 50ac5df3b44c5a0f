-- wrk script of bench/run: spreads requests over the hosts listed in a file (one per line,
-- the path after `--`), each connection walking the list from its own starting point.
-- Requests are formatted once, in init: the per-request cost on wrk's side stays the same
-- whatever the number of hosts. Prints one `BENCH {json}` line when done.

local requests = {}
local index = 0

function init(args)
  local file = assert(io.open(args[1], "r"), "cannot open the hosts file")
  for host in file:lines() do
    if host ~= "" then
      requests[#requests + 1] = wrk.format("GET", "/", { Host = host })
    end
  end
  file:close()
  assert(#requests > 0, "no hosts")
  math.randomseed(os.time())
  index = math.random(#requests)
end

function request()
  index = index % #requests + 1
  return requests[index]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"p50_us":%.1f,"p99_us":%.1f,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeout_errors":%d,"status_errors":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.timeout, e.status))
end
