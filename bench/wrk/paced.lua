-- One step of an open-loop ladder (bench/load.py): every connection sends one request per
-- `interval` ms (script argument 1), with the method and JSON body of arguments 2 and 3;
-- headers come from wrk's -H. With enough connections the interval, not the server's
-- answer, sets the pace; a server that falls behind shows as fewer requests than offered.
-- done() prints one JSON line: counts, errors and latency percentiles in microseconds.
local interval

function init(args)
  interval = tonumber(args[1])
  if args[2] and args[2] ~= "" then wrk.method = args[2] end
  if args[3] and args[3] ~= "" then
    wrk.body = args[3]
    wrk.headers["Content-Type"] = "application/json"
  end
end

function delay()
  return interval
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"status_errors":%d,"socket_errors":%d,' ..
    '"p50_us":%d,"p95_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
