"""REST API: thin views over access services. (Being written.)"""

from rest_framework.views import APIView


class _Stub(APIView):
    pass


ReleaseList = CurrentLicense = LicenseAccept = ApplicationListCreate = ApplicationDetail = _Stub
ApplicationSubmit = ApplicationWithdraw = ApplicationAnswer = ReviewQueue = ReviewDetail = _Stub
ReviewApprove = ReviewReject = ReviewRequestInfo = ReviewRevoke = _Stub
