# ctest properties of the fault-tolerance tests (tests/faults/), included by
# CTestTestfile.cmake after the tests gtest_discover_tests found, so these
# override the default TIMEOUT of switchyard_test(). Names that do not exist
# (a renamed test) are ignored by ctest.
#
# Measured on 2 cores, idle: each test takes 3-15 s; the timeouts leave room
# for a loaded CI machine (ctest -j2) and for the in-test bounds (20-30 s
# recovery loops, 30 s grace periods, the load test's 120 s safety bound).
set_tests_properties(
  ReplicaFailoverTest.KillingOneOfTwoReplicasMidStreamLosesNoRequest
  ReplicaFailoverTest.GracefulStopOfOneOfTwoReplicasMidStreamLosesNoRequest
  ReplicaFailoverTest.KillingTheOnlyReplicaFailsItsRequestsAndRecoversAfterRestart
  ReplicaFailoverTest.AKilledExpertFailsOnlyTheRequestsRoutedToIt
  ShutdownTest.ExpertFinishesCallsInFlightOnSigtermRefusesNewOnesAndExitsZero
  TopologyReloadTest.ReplicasJoinAndLeaveUnderLoadWithoutDroppingARequest
  PROPERTIES TIMEOUT 120)
set_tests_properties(
  NetnsTest.CutLinkFailsItsRequestsAndServiceResumesWhenRestored
  NetnsTest.CutLinkToOneReplicaHostLosesNoRequest
  ShutdownTest.GatewayFinishesStreamsInFlightOnSigtermRefusesNewOnesAndExitsZero
  PROPERTIES TIMEOUT 180)
set_tests_properties(
  LoadTest.SixtyFourConcurrentStreamsOverTheSplitClusterAllSucceed
  PROPERTIES TIMEOUT 240)
