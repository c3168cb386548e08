-- Argo CD health of an AdapterMerge (adaptermerge.io/v1alpha1), from the status the operator writes.
-- Progressing: the operator has not yet handled the latest spec, or the merge Job runs, or no verdict yet.
-- Healthy: condition Ready is True (merge written, evaluation passed). Degraded: Ready is False, or
-- Stalled is True (the run failed). Reconciling True (a run under way) is Progressing: the same
-- conditions kstatus (Flux) reads, see docs/operator.md "Status".
local hs = {}
local status = obj.status
local generation = obj.metadata.generation

local function find_condition(conditions, type)
  for _, condition in ipairs(conditions or {}) do
    if condition.type == type then
      return condition
    end
  end
  return nil
end

local function lags(observed)
  return generation ~= nil and (observed == nil or observed < generation)
end

if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to pick up the AdapterMerge"
  return hs
end

if lags(status.observedGeneration) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to handle generation " .. tostring(generation)
  return hs
end

local function is_true(type)
  local condition = find_condition(status.conditions, type)
  return condition ~= nil and condition.status == "True" and not lags(condition.observedGeneration)
end

-- A run for the current generation still pending or running: any Ready condition is from before it.
if is_true("Reconciling") or status.phase == "Pending" or status.phase == "Running" then
  hs.status = "Progressing"
  hs.message = "Merge " .. string.lower(status.phase or "Pending")
  if status.jobName ~= nil then
    hs.message = hs.message .. " (Job " .. status.jobName .. ")"
  end
  local reconciling = find_condition(status.conditions, "Reconciling")
  if reconciling ~= nil and reconciling.status == "True" then
    hs.message = hs.message .. ": " .. (reconciling.reason or "") .. ": " .. (reconciling.message or "")
  end
  return hs
end

local ready = find_condition(status.conditions, "Ready")
if ready == nil or ready.status == "Unknown" or lags(ready.observedGeneration) then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  return hs
end

local detail = (ready.reason or "") .. ": " .. (ready.message or "")
if ready.status == "True" and not is_true("Stalled") then
  hs.status = "Healthy"
else
  hs.status = "Degraded"
end
hs.message = detail
return hs
