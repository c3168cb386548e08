-- Argo CD health of an AdapterMerge (adaptermerge.io/v1alpha1), from the status the operator writes.
-- Progressing: the operator has not yet handled the latest spec, or the merge Job runs, or no verdict yet.
-- Healthy: condition Ready is True (merge written, evaluation passed). Degraded: Ready is False.
local hs = {}
local status = obj.status
local generation = obj.metadata.generation

local function find_ready(conditions)
  for _, condition in ipairs(conditions or {}) do
    if condition.type == "Ready" then
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

-- A Job for the current generation still pending or running: any Ready condition is from before it.
if status.phase == "Pending" or status.phase == "Running" then
  hs.status = "Progressing"
  hs.message = "Merge " .. string.lower(status.phase)
  if status.jobName ~= nil then
    hs.message = hs.message .. " (Job " .. status.jobName .. ")"
  end
  return hs
end

local ready = find_ready(status.conditions)
if ready == nil or ready.status == "Unknown" or lags(ready.observedGeneration) then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  return hs
end

local detail = (ready.reason or "") .. ": " .. (ready.message or "")
if ready.status == "True" then
  hs.status = "Healthy"
else
  hs.status = "Degraded"
end
hs.message = detail
return hs
