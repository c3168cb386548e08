/* The pod sandbox's process (the "pause" container): holds the pod's namespaces open, reaps the
 * children it inherits as PID 1, and exits on SIGINT/SIGTERM. A public pause image cannot be pulled
 * here, so the node builds this one (scripts/real-node/build-images.sh, docs/real-node.md). */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }

int main(void) {
  signal(SIGINT, stop);
  signal(SIGTERM, stop);
  signal(SIGCHLD, reap);
  for (;;) pause();
}
