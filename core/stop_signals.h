// The signals that stop a server (SIGINT, SIGTERM), for the mains that take
// them synchronously (sigwait, signalfd) instead of through a handler.
//
// Thread-safety: BlockStopSignals changes the calling thread's mask; call it
// from main before any thread starts, so every thread inherits the mask.
#ifndef SWITCHYARD_CORE_STOP_SIGNALS_H_
#define SWITCHYARD_CORE_STOP_SIGNALS_H_

#include <pthread.h>
#include <signal.h>

namespace switchyard {

// {SIGINT, SIGTERM}.
inline sigset_t StopSignals() {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  return signals;
}

// Blocks StopSignals() in the calling thread and returns them.
inline sigset_t BlockStopSignals() {
  const sigset_t signals = StopSignals();
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  return signals;
}

}  // namespace switchyard

#endif  // SWITCHYARD_CORE_STOP_SIGNALS_H_
