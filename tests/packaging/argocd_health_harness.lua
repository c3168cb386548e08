-- Runs an Argo CD health script the way Argo CD does: the resource as the global `obj`, the script's
-- returned table read as the verdict. Usage: lua5.4 argocd_health_harness.lua HEALTH.lua OBJECT.lua
-- (OBJECT.lua returns the resource as a Lua table). Prints the status line, then the message line.
obj = dofile(arg[2])
local hs = dofile(arg[1])
print(hs.status)
print(hs.message)
